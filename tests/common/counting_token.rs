//! A token endpoint on 127.0.0.1 that answers every request with the same scripted JSON body
//! (any `expires_in`, even absurd ones) and records when each request arrived, on tokio's clock.
//! [`CountingTokenEndpoint::reached`] resolves once a number of requests has arrived, so a test
//! on the paused clock can notice a flood that never lets the clock advance.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

struct State {
    body: serde_json::Value,
    seen: Vec<Instant>,
}

#[derive(Clone)]
pub struct CountingTokenEndpoint {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    count: watch::Receiver<usize>,
}

impl CountingTokenEndpoint {
    pub async fn start(body: serde_json::Value) -> CountingTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            body,
            seen: Vec::new(),
        }));
        let (tx, count) = watch::channel(0usize);
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/{tenant}/oauth2/v2.0/token",
            axum::routing::post(move || {
                let shared = shared.clone();
                let tx = tx.clone();
                async move {
                    let body = {
                        let mut s = shared.lock().expect("state");
                        s.seen.push(Instant::now());
                        tx.send_replace(s.seen.len());
                        s.body.clone()
                    };
                    axum::Json(body)
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        CountingTokenEndpoint { addr, state, count }
    }

    pub fn url(&self, tenant: &str) -> String {
        format!("http://{}/{tenant}/oauth2/v2.0/token", self.addr)
    }

    pub fn set_body(&self, body: serde_json::Value) {
        self.state.lock().expect("state").body = body;
    }

    /// When each request arrived.
    pub fn seen(&self) -> Vec<Instant> {
        self.state.lock().expect("state").seen.clone()
    }

    /// Resolves once at least `n` requests have arrived.
    pub async fn reached(&self, n: usize) {
        let mut rx = self.count.clone();
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}
