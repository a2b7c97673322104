"""Rendering check of the Helm chart (no helm binary: render.py renders the subset the chart
uses). Renders the chart with its default values and with each ci/*.yaml, parses every document
as YAML and relay.toml as TOML, and checks what the chart promises. Usage:
python3 deploy/helm/check.py [--go-render GOTEMPLATE] [RELAY_BINARY]
With a relay binary, its `config` must accept each rendered relay.toml; with --go-render (the
program in gotemplate/, built by check.sh when a Go toolchain is there), Go's text/template must
render every case to the same documents as render.py, and refuse the same values.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import render  # noqa: E402

CHART = os.path.join(HERE, "smtp-oauth-relay")
REPO = os.path.dirname(os.path.dirname(HERE))
failures = []
checked = [0]


def check(cond, what):
    checked[0] += 1
    if not cond:
        failures.append(what)
    return cond


def metric_names():
    src = open(os.path.join(REPO, "src", "metrics.rs")).read()
    names = set(re.findall(r'"((?:relay|process)_[a-z_]+)"', src))
    names |= set(re.findall(r"# (?:HELP|TYPE) ((?:relay|process)_[a-z_]+) ", src))
    for h in re.findall(r'render\(\s*&mut out,\s*"([a-z_]+)"', src):
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    return names


def used_metrics(expr):
    return set(re.findall(r"\b((?:relay|process)_[a-z_]+)\b", expr))


def docs_of(values_files):
    out, values = render.render_chart(CHART, values_files)
    docs = []
    for name, text in out.items():
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                docs.append((name, doc))
    return docs, values


def scenario(label, values_files, binary):
    docs, values = docs_of(values_files)
    mode = values["mode"]
    kinds = {}
    for _, d in docs:
        check(isinstance(d, dict) and "kind" in d and "apiVersion" in d, f"{label}: a document without kind/apiVersion")
        kinds.setdefault(d["kind"], []).append(d)
    config_maps = [d for d in kinds.get("ConfigMap", []) if "relay.toml" in d.get("data", {})]
    if not check(len(config_maps) == 1, f"{label}: one ConfigMap with relay.toml"):
        return
    toml_text = config_maps[0]["data"]["relay.toml"]
    relay = tomllib.loads(toml_text)

    # No secret in any ConfigMap: only *_file paths under /run/secrets.
    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, path + [k])
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, path + [str(i)])
        else:
            key = path[-1] if path and not path[-1].isdigit() else path[-2]
            check(key not in ("client_secret", "url", "password", "private_key"),
                  f"{label}: secret-looking key {'.'.join(path)} in relay.toml")
            if isinstance(obj, str):
                check(not re.search(r"postgres(ql)?://[^ ]*:[^@ ]*@", obj), f"{label}: a URL with a password in relay.toml")
    walk(relay, [])
    for cm in kinds.get("ConfigMap", []):
        blob = json.dumps(cm)
        check("PASTE" not in blob and "BEGIN PRIVATE KEY" not in blob, f"{label}: secret material in ConfigMap {cm['metadata']['name']}")
    check("Secret" not in kinds, f"{label}: the chart renders no Secret (it only references them)")

    routes = relay.get("route", [])
    check([r["name"] for r in routes] == [r["name"] for r in values["routes"]], f"{label}: routes in relay.toml follow values.routes")

    if mode == "sidecar":
        check(set(kinds) == {"ConfigMap"} or set(kinds) <= {"ConfigMap", "PrometheusRule"}, f"{label}: sidecar renders the ConfigMap only, got {sorted(kinds)}")
        check(relay["smtp"]["listen"] == ["127.0.0.1:2525"], f"{label}: sidecar SMTP on loopback")
        check(relay["queue"]["backend"] == "files", f"{label}: sidecar keeps a file spool")
    else:
        workload_kind = "Deployment" if mode == "deployment" else "StatefulSet"
        for k in (workload_kind, "Service", "ConfigMap"):
            check(k in kinds, f"{label}: kind {k} rendered")
        check(("StatefulSet" if mode == "deployment" else "Deployment") not in kinds, f"{label}: one workload kind")
        w = kinds[workload_kind][0]
        spec = w["spec"]
        pod = spec["template"]["spec"]
        pod_labels = spec["template"]["metadata"]["labels"]
        check(all(pod_labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()), f"{label}: selector matches pod labels")
        if mode == "deployment":
            check(spec["replicas"] >= 2, f"{label}: Deployment replicas >= 2 (got {spec['replicas']})")
            check(relay["queue"]["backend"] == "postgres", f"{label}: Deployment on the postgres queue")
            check("url_file" in relay["queue"] and "url" not in relay["queue"], f"{label}: database URL from a file")
            check("PodDisruptionBudget" in kinds, f"{label}: PodDisruptionBudget with the Deployment")
            for pdb in kinds.get("PodDisruptionBudget", []):
                check(pdb["spec"]["minAvailable"] < spec["replicas"], f"{label}: PDB leaves room for a drain")
                check(all(pod_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), f"{label}: PDB selects the pods")
        else:
            check(spec["replicas"] == 1, f"{label}: StatefulSet replicas 1")
            check(relay["queue"]["backend"] == "files", f"{label}: StatefulSet on the file spool")
            check([t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])] == ["spool"], f"{label}: spool PVC")
            check("PodDisruptionBudget" not in kinds, f"{label}: no PDB for a single relay (it would block drains)")
        # Security context.
        psc = pod["securityContext"]
        check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, f"{label}: non-root pod")
        c = pod["containers"][0]
        sc = c["securityContext"]
        check(sc.get("readOnlyRootFilesystem") is True, f"{label}: read-only root fs")
        check(sc.get("allowPrivilegeEscalation") is False, f"{label}: no privilege escalation")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: drop ALL")
        # Ports and probes on the admin endpoint.
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        admin_port = int(relay["admin"]["listen"].rsplit(":", 1)[1])
        smtp_port = int(relay["smtp"]["listen"][0].rsplit(":", 1)[1])
        check(ports.get("admin") == admin_port, f"{label}: container port admin = [admin] listen")
        check(ports.get("smtp") == smtp_port, f"{label}: container port smtp = [smtp] listen")
        check(relay["admin"]["listen"].startswith("0.0.0.0:") and relay["smtp"]["listen"][0].startswith("0.0.0.0:"), f"{label}: listening on the pod IP")
        rp, lp = c["readinessProbe"], c["livenessProbe"]
        check(rp.get("httpGet", {}).get("path") == "/readyz" and rp["httpGet"]["port"] in ("admin", admin_port), f"{label}: readiness on /readyz of the admin port")
        check("tcpSocket" in lp and lp["tcpSocket"]["port"] in ("admin", admin_port), f"{label}: liveness is a TCP check of the admin port (never /healthz)")
        svc = kinds["Service"][0]
        check({p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"smtp": "smtp", "admin": "admin"}, f"{label}: Service ports")
        # Every *_file under /run/secrets is a mounted Secret volume.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        vols.update({t["metadata"]["name"]: {"pvc": True} for t in spec.get("volumeClaimTemplates", [])})
        check(all(m in vols for m in mounts.values()), f"{label}: every mount has a volume")
        check(mounts.get("/etc/smtp-oauth-relay") == "config" and vols["config"]["configMap"]["name"] == config_maps[0]["metadata"]["name"], f"{label}: relay.toml mounted")
        files = []
        for section in [relay.get("queue", {}), relay.get("oauth", {})] + [r.get("oauth", {}) for r in routes]:
            files += [v for k, v in section.items() if k.endswith("_file") and v.startswith("/run/secrets/")]
        for f in files:
            d = os.path.dirname(f)
            check(d in mounts and "secret" in vols.get(mounts[d], {}), f"{label}: {f} is in a mounted Secret")
        for sm in kinds.get("ServiceMonitor", []):
            check(sm["spec"]["endpoints"][0]["port"] == "admin" and sm["spec"]["endpoints"][0]["path"] == "/metrics", f"{label}: ServiceMonitor scrapes admin /metrics")
            check(all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), f"{label}: ServiceMonitor selects the Service")

    known = metric_names()
    for rule in kinds.get("PrometheusRule", []):
        alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
        exprs = " ".join(r["expr"] for r in alerts)
        used = used_metrics(exprs)
        check(used <= known, f"{label}: PrometheusRule uses unknown metrics {sorted(used - known)}")
        for m in ("relay_mailbox_held", "relay_queue_oldest_age_seconds", "relay_failed_total", "relay_possible_duplicates_total"):
            check(m in used, f"{label}: PrometheusRule alerts on {m}")
    for cm in kinds.get("ConfigMap", []):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".json"):
                check(cm["metadata"]["labels"].get("grafana_dashboard") is not None, f"{label}: dashboard ConfigMap has the grafana_dashboard label")
                dash = json.loads(text)
                exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
                used = used_metrics(exprs)
                check(used and used <= known, f"{label}: dashboard uses unknown metrics {sorted(used - known)}")

    if binary:
        # The relay itself must accept the rendered relay.toml, with stand-ins for the Secrets
        # at the paths it names.
        with tempfile.TemporaryDirectory() as tmp:
            text = toml_text
            for src in sorted(set(re.findall(r'^\s*\w+_file = "(/[^"]+)"', toml_text, re.M))):
                text = text.replace(f'"{src}"', f'"{tmp}/secrets{src}"')
            for f in re.findall(r'"(' + re.escape(tmp) + r'/secrets/[^"]+)"', text):
                os.makedirs(os.path.dirname(f), exist_ok=True)
                with open(f, "w") as out:
                    if f.endswith(".pem"):
                        out.write(open("/etc/ssl/certs/ca-certificates.crt").read())
                    elif "/database/" in f and f.endswith("/url"):
                        out.write("postgres://relay:not-a-password@db.internal/relay")
                    else:
                        out.write("not-a-secret")
            path = os.path.join(tmp, "relay.toml")
            open(path, "w").write(text)
            env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
            r = subprocess.run([binary, "config", "--config", path], capture_output=True, text=True, env=env, timeout=30)
            check(r.returncode == 0, f"{label}: `config` refused the rendered relay.toml: {r.stdout}{r.stderr}")
    return kinds


REFUSED = []


def refused(label, override, needle):
    path = os.path.join(tempfile.mkdtemp(), "v.yaml")
    open(path, "w").write(yaml.safe_dump(override))
    REFUSED.append(path)
    try:
        render.render_chart(CHART, [path])
    except render.Fail as e:
        check(needle in str(e), f"{label}: refused, but with {e}")
        return
    check(False, f"{label}: rendered instead of failing")


def chart_lint():
    """What `helm lint` would catch that rendering does not: Chart.yaml's fields, and a
    .Values path in a template that the default values do not have (a typo renders as empty)."""
    meta = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))
    check(meta.get("apiVersion") == "v2" and meta.get("name") == os.path.basename(CHART), "Chart.yaml: apiVersion v2, name = directory")
    check(re.fullmatch(r"\d+\.\d+\.\d+", str(meta.get("version", ""))) is not None, "Chart.yaml: semver version")
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    tdir = os.path.join(CHART, "templates")
    for name in sorted(os.listdir(tdir)):
        for path in re.findall(r"\.Values((?:\.\w+)+)", open(os.path.join(tdir, name)).read()):
            parts = path[1:].split(".")
            v, ok = values, True
            for i, part in enumerate(parts):
                if isinstance(v, dict) and part in v:
                    v = v[part]
                elif parts[0] == "config" and i == 2:
                    break  # an optional relay.toml key under config.<section>
                else:
                    ok = False
                    break
            check(ok, f"templates/{name}: .Values{path} is not in values.yaml")


def go_crosscheck(go_render, values_files):
    """Go's text/template and render.py agree on this case: same documents, same relay.toml
    text, or both refuse."""
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    for vf in values_files:
        values = render.merge(values, yaml.safe_load(open(vf)) or {})
    meta = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))
    root = {"Values": values, "Release": {"Name": "relay", "Namespace": "mail", "Service": "Helm"},
            "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]}}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(root, f)
        f.flush()
        go = json.loads(subprocess.run([go_render, CHART, f.name], capture_output=True, text=True, check=True, timeout=30).stdout)
    label = ",".join(os.path.basename(v) for v in values_files) or "defaults"
    try:
        py, _ = render.render_chart(CHART, values_files)
    except render.Fail as e:
        check("error" in go, f"go cross-check {label}: render.py refuses ({e}), Go renders")
        return
    if not check("error" not in go, f"go cross-check {label}: Go refuses: {go.get('error')}"):
        return
    for name in sorted(set(go) | set(py)):
        a = [d for d in yaml.safe_load_all(go.get(name, "")) if d is not None]
        b = [d for d in yaml.safe_load_all(py.get(name, "")) if d is not None]
        check(a == b, f"go cross-check {label}: {name} differs between Go and render.py")


def main():
    chart_lint()
    args = sys.argv[1:]
    go_render = None
    if args[:1] == ["--go-render"]:
        go_render, args = args[1], args[2:]
    binary = args[0] if args else None
    scenarios = [("defaults", [])] + [
        (f, [os.path.join(CHART, "ci", f)]) for f in sorted(os.listdir(os.path.join(CHART, "ci")))
    ]
    n = 0
    for label, vf in scenarios:
        try:
            kinds = scenario(label, vf, binary)
        except render.Fail as e:
            check(False, f"{label}: render failed: {e}")
            continue
        n += 1
        print(f"{label}: {', '.join(f'{k} x{len(v)}' for k, v in sorted((kinds or {}).items()))}")
    refused("inline client secret", {"config": {"oauth": {"client_secret": "s3cret"}}}, "client_secret")
    refused("inline database url", {"config": {"queue": {"url": "postgres://u:p@db/relay"}}}, "queue.url")
    refused("inline route secret", {"routes": [{"name": "x", "oauth": {"client_secret": "s3cret"}}]}, "client_secret")
    refused("no database secret", {"queue": {"database": {"existingSecret": ""}}}, "existingSecret")
    refused("unknown mode", {"mode": "daemonset"}, "mode")
    if go_render:
        for _, vf in scenarios:
            go_crosscheck(go_render, vf)
        for path in REFUSED:
            go_crosscheck(go_render, [path])
        print(f"go cross-check: {len(scenarios) + len(REFUSED)} cases rendered by Go's text/template")
    for f in failures:
        print("FAIL", f)
    print(f"helm chart: {checked[0] - len(failures)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


main()
