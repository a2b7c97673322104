"""A renderer for exactly the Go-template subset the chart's templates use (no helm here).

Supported: text with {{ }} actions and {{- -}} trimming; if / else if / else / end; range over a
list or a map (plain, `$v :=` or `$k, $v :=`); pipelines of .Values/.Release/.Chart fields, `$`,
`$var`, string and number literals and the functions toYaml, toJson, nindent, indent, quote,
default, required, fail, eq, ne, not, and, or, plus .Files.Get. Anything else is an error, so a
template that strays from the subset fails the check instead of rendering differently.
"""
import json
import os
import re
import shlex

import yaml


class Fail(Exception):
    pass


TOKEN = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def tokenize(src):
    out, pos = [], 0
    for m in TOKEN.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2), bool(m.group(3))))
        pos = m.end()
    out.append(("text", src[pos:]))
    # -}} trims the whitespace after it
    for i, t in enumerate(out):
        if t[0] == "action" and t[2] and i + 1 < len(out):
            out[i + 1] = ("text", out[i + 1][1].lstrip())
    return [t for t in out if not (t[0] == "text" and t[1] == "")]


def parse(tokens, i=0, stop=("end",)):
    """Returns (nodes, index of the stopping token)."""
    nodes = []
    while i < len(tokens):
        t = tokens[i]
        if t[0] == "text":
            nodes.append(("text", t[1]))
            i += 1
            continue
        act = t[1]
        if act.startswith("/*"):
            i += 1
            continue
        word = act.split(None, 1)[0]
        if word in ("end", "else") and word in stop:
            return nodes, i
        if word == "if":
            branches = []
            cond = act[2:].strip()
            while True:
                body, i = parse(tokens, i + 1, stop=("end", "else"))
                branches.append((cond, body))
                a = tokens[i][1]
                if a == "end":
                    break
                rest = a[4:].strip()
                cond = rest[2:].strip() if rest.startswith("if") else None
            nodes.append(("if", branches))
            i += 1
        elif word == "range":
            spec = act[5:].strip()
            m = re.match(r"^(\$\w+)(?:\s*,\s*(\$\w+))?\s*:=\s*(.*)$", spec)
            names = (m.group(1), m.group(2)) if m else (None, None)
            expr = m.group(3) if m else spec
            body, i = parse(tokens, i + 1)
            nodes.append(("range", names, expr, body))
            i += 1
        elif word in ("end", "else"):
            raise Fail(f"unexpected {{{{ {act} }}}}")
        elif word in ("define", "template", "include", "with", "block", "tpl"):
            raise Fail(f"outside the supported subset: {{{{ {act} }}}}")
        else:
            nodes.append(("out", act))
            i += 1
    if stop != ("__top__",):
        raise Fail("missing {{ end }}")
    return nodes, i


def lookup(obj, path):
    for part in path:
        if part == "":
            continue
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif obj is None:
            raise Fail(f"nil pointer evaluating .{'.'.join(path)}")
        else:
            raise Fail(f"cannot take .{part} of {type(obj).__name__}")
    return obj


def truthy(v):
    return v not in (None, False, 0, "", [], {})


def to_yaml(v):
    if v is None or v == {} or v == []:
        return "{}" if isinstance(v, dict) or v is None else "[]"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def go_str(v):
    if v is None:
        return ""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (dict, list)):
        return "map[...]" if isinstance(v, dict) else "[...]"
    return str(v)


def render(src, root, files):
    nodes, _ = parse(tokenize(src), 0, stop=("__top__",))
    out = []
    run(nodes, {"$": root}, root, out, files)
    return "".join(out)


def run(nodes, scope, dot, out, files):
    for n in nodes:
        if n[0] == "text":
            out.append(n[1])
        elif n[0] == "out":
            v = pipeline(n[1], scope, dot, files)
            if v is not None:
                out.append(go_str(v))
        elif n[0] == "if":
            for cond, body in n[1]:
                if cond is None or truthy(pipeline(cond, scope, dot, files)):
                    run(body, scope, dot, out, files)
                    break
        elif n[0] == "range":
            (kname, vname), expr, body = n[1], n[2], n[3]
            coll = pipeline(expr, scope, dot, files)
            items = sorted(coll.items()) if isinstance(coll, dict) else list(enumerate(coll or []))
            for k, v in items:
                s = dict(scope)
                if kname and vname:
                    s[kname], s[vname] = k, v
                elif kname:
                    s[kname] = v
                run(body, s, v, out, files)


def pipeline(expr, scope, dot, files):
    value, first = None, True
    for cmd in split_pipe(expr):
        args = shlex.split(cmd, posix=False)
        value = command(args, scope, dot, files, None if first else [value])
        first = False
    return value


def split_pipe(expr):
    parts, cur, q = [], "", False
    for ch in expr:
        if ch == '"':
            q = not q
        if ch == "|" and not q:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def operand(a, scope, dot):
    if a.startswith('"'):
        return json.loads(a)
    if re.fullmatch(r"-?\d+", a):
        return int(a)
    if a in ("true", "false"):
        return a == "true"
    if a == ".":
        return dot
    if a.startswith("$"):
        name, _, rest = a.partition(".")
        if name not in scope:
            raise Fail(f"undefined variable {name}")
        return lookup(scope[name], rest.split(".")) if rest else scope[name]
    if a.startswith("."):
        return lookup(dot, a[1:].split("."))
    raise Fail(f"unsupported operand {a!r}")


def command(args, scope, dot, files, piped):
    head, rest = args[0], args[1:]
    if head in ("$.Files.Get", ".Files.Get"):
        name = operand(rest[0], scope, dot)
        with open(os.path.join(files, name)) as f:
            return f.read()
    if head in FUNCS:
        vals = [operand(a, scope, dot) for a in rest] + (piped or [])
        return FUNCS[head](*vals)
    if rest or piped:
        raise Fail(f"unknown function {head}")
    return operand(head, scope, dot)


def nindent(n, s):
    return "\n" + indent(n, s)


def indent(n, s):
    # As Helm's: every line padded, empty ones too.
    pad = " " * n
    return pad + go_str(s).replace("\n", "\n" + pad)


def default(d, v=None):
    return v if truthy(v) else d


def required(msg, v=None):
    if not truthy(v):
        raise Fail(msg)
    return v


def fail(msg):
    raise Fail(msg)


FUNCS = {
    "toYaml": to_yaml,
    "toJson": lambda v: json.dumps(v, separators=(",", ":")),
    "nindent": nindent,
    "indent": indent,
    "quote": lambda v: json.dumps(go_str(v)),
    "default": default,
    "required": required,
    "fail": fail,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not truthy(a),
    "and": lambda *a: all(truthy(x) for x in a),
    "or": lambda *a: any(truthy(x) for x in a),
}


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def render_chart(chart, values_files=(), release="relay", namespace="mail"):
    with open(os.path.join(chart, "values.yaml")) as f:
        values = yaml.safe_load(f) or {}
    for vf in values_files:
        with open(vf) as f:
            values = merge(values, yaml.safe_load(f) or {})
    with open(os.path.join(chart, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    root = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]},
    }
    out = {}
    tdir = os.path.join(chart, "templates")
    for name in sorted(os.listdir(tdir)):
        if name.endswith(".yaml"):
            with open(os.path.join(tdir, name)) as f:
                out[name] = render(f.read(), root, chart)
    return out, values
