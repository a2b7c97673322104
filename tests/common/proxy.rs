//! A TCP forwarder on 127.0.0.1 that counts the connections it carries: a test points the
//! relay's `upstream.port` at it and learns which connections went through it (and so which
//! upstream settings a connection was opened with). [`Proxy::cut`] makes the target
//! unreachable (open connections closed, new ones closed at once) until [`Proxy::restore`]:
//! a database outage without stopping the shared test cluster.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    stop: CancellationToken,
    blocked: Arc<AtomicBool>,
    /// Cancelled by `cut`: ends the connections open at that moment.
    open: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    /// Forwards every connection to `target` until dropped.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (count, cancelled) = (connections.clone(), stop.clone());
        let blocked = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(stop.child_token()));
        let (is_blocked, generation) = (blocked.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = cancelled.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if is_blocked.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let cancelled = generation.lock().unwrap_or_else(|p| p.into_inner()).clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cancelled.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            connections,
            stop,
            blocked,
            open,
        }
    }

    /// The target becomes unreachable: open connections are closed, new ones closed at once.
    pub fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.cancel();
        *open = self.stop.child_token();
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
