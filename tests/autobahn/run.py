#!/usr/bin/env python3
"""Run the Autobahn|Testsuite fuzzing client (wstest 0.8.2) against a WebSocket server.

    run.py --url ws://127.0.0.1:PORT --agent NAME --outdir DIR \
           [--cases '1.*,2.*' ...] [--exclude '12.*,13.*' ...] [--wstest PATH] [--timeout S]

Writes DIR/spec.json, runs `wstest -m fuzzingclient -s DIR/spec.json` (its output goes to
DIR/wstest.log), then reads DIR/index.json and prints:
  * counts per verdict, for `behavior` and for `behaviorClose`;
  * one line per case that is not OK/INFORMATIONAL (case id, behavior, behaviorClose, and
    the case's description/result from its per-case JSON report);
  * a last line exactly `autobahn: N passed, M failed` (passed = behavior and behaviorClose
    both OK or INFORMATIONAL).

Exit status: 0 if every case passed, 1 if any failed, 2 on a harness error (wstest missing,
wstest timed out, no report written, no case run).

TLS: give a wss:// URL (or --tls, which turns ws:// into wss://); nothing else is needed.
wstest 0.8.2 (Twisted 19.10 + pyOpenSSL) sends no SNI and checks no certificate, so a
self-signed certificate for any name works, and a server that *requires* SNI will not.

wstest is found as: --wstest, else $WHARF_WSTEST, else $WHARF_AUTOBAHN_DIR/venv27/bin/wstest,
else <repo>/target/autobahn/venv27/bin/wstest (where tests/autobahn/install.sh puts it), else
`wstest` on PATH.

Notes: wstest writes its report only when the whole run finishes, so a run killed by the
timeout leaves no index.json (exit 2). Cases 1-11 (~300) take ~25 s against a fast local
server; the compression groups 12.* and 13.* take ~15 min more (client-bound).
Python 3 standard library only.
"""

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PASS_VERDICTS = ("OK", "INFORMATIONAL")
VERDICT_ORDER = ["OK", "INFORMATIONAL", "NON-STRICT", "UNIMPLEMENTED", "WRONG CODE", "UNCLEAN", "FAILED"]


def split_patterns(values):
    out = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def case_key(case_id):
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"\.", case_id))


def find_wstest(explicit):
    if explicit:
        return explicit
    if os.environ.get("WHARF_WSTEST"):
        return os.environ["WHARF_WSTEST"]
    cands = []
    if os.environ.get("WHARF_AUTOBAHN_DIR"):
        cands.append(os.path.join(os.environ["WHARF_AUTOBAHN_DIR"], "venv27", "bin", "wstest"))
    cands.append(os.path.join(REPO, "target", "autobahn", "venv27", "bin", "wstest"))
    for c in cands:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("wstest") or cands[-1]


def one_line(text, limit=300):
    text = " ".join(str(text).split())
    text = re.sub(r"<[^>]+>", "", text)  # descriptions contain some HTML (<br>, <b>, ...)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_case_details(outdir, entry):
    """description/result from the per-case JSON report next to index.json, if present."""
    report = entry.get("reportfile") or ""
    path = os.path.join(outdir, os.path.splitext(report)[0] + ".json") if report else ""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return {
        "description": data.get("description", ""),
        "result": data.get("result", ""),
        "resultClose": data.get("resultClose", ""),
    }


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def watch(proc, log_path, timeout, t0):
    """Wait for wstest; returns (exit code, None) or (None, reason it was killed).

    wstest 0.8.2 never exits when the case patterns select no case ("will run 0 test
    cases"), so that is detected in its log and turned into a harness error. A progress
    line is printed every 60 s, so a long run (12.*/13.* take ~15 min) is not silent.
    """
    total = None
    next_progress = t0 + 60
    while True:
        try:
            return proc.wait(timeout=0.5), None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - t0 > timeout:
            kill_group(proc)
            return None, ("wstest timed out after %.0f s (no report is written before the end)" % timeout)
        if total is None or now >= next_progress:
            try:
                with open(log_path, errors="replace") as f:
                    text = f.read()
            except OSError:
                text = ""
            m = re.search(r"will run (\d+) test cases", text)
            if m:
                total = int(m.group(1))
                if total == 0:
                    kill_group(proc)
                    return None, "the --cases/--exclude patterns select no case (wstest would hang)"
            if now >= next_progress:
                started = text.count("Running test case ID")
                print("autobahn: ... %d/%s cases started, %.0f s" % (started, total if total is not None else "?",
                                                                     now - t0), flush=True)
                next_progress = now + 60


def harness_error(msg, log_path=None):
    print("autobahn: harness error: " + msg, file=sys.stderr)
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            tail = f.readlines()[-25:]
        if tail:
            print("---- last lines of %s ----" % log_path, file=sys.stderr)
            sys.stderr.write("".join(tail))
            print("----", file=sys.stderr)
    return 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="ws://HOST:PORT[/path] or wss://...")
    ap.add_argument("--agent", default="wharf", help="agent name in the report (default: wharf)")
    ap.add_argument("--outdir", required=True, help="report directory (created)")
    ap.add_argument("--cases", action="append", help="case patterns, comma separated, repeatable (default: *)")
    ap.add_argument("--exclude", action="append", help="case patterns to exclude, comma separated, repeatable")
    ap.add_argument("--wstest", help="path of wstest (default: see module doc)")
    ap.add_argument("--tls", action="store_true", help="use wss:// (a wss:// URL implies it)")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("WHARF_AUTOBAHN_TIMEOUT", 3600)),
                    help="seconds before wstest is killed (default 3600)")
    args = ap.parse_args(argv)

    url = args.url
    if args.tls and url.startswith("ws://"):
        url = "wss://" + url[len("ws://"):]
    if not re.match(r"^wss?://", url):
        return harness_error("--url must start with ws:// or wss:// (got %r)" % url)

    wstest = find_wstest(args.wstest)
    if not (os.path.isfile(wstest) and os.access(wstest, os.X_OK)):
        return harness_error("wstest not found at %s; run tests/autobahn/install.sh first "
                             "(or pass --wstest / set WHARF_WSTEST)" % wstest)

    outdir = os.path.abspath(args.outdir)
    os.makedirs(outdir, exist_ok=True)
    index_path = os.path.join(outdir, "index.json")
    spec_path = os.path.join(outdir, "spec.json")
    log_path = os.path.join(outdir, "wstest.log")
    # A stale report must never be mistaken for this run's.
    for stale in (index_path,):
        if os.path.exists(stale):
            os.remove(stale)

    cases = split_patterns(args.cases) or ["*"]
    exclude = split_patterns(args.exclude)
    spec = {
        "outdir": outdir,
        "servers": [{"agent": args.agent, "url": url, "options": {"version": 18}}],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")

    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):  # a py3 setting would break py2
        env.pop(var, None)
    # Silence cryptography 3.3's "Python 2 is no longer supported" warning in the log.
    env["PYTHONWARNINGS"] = "ignore"

    print("autobahn: wstest %s -> %s (cases %s, exclude %s); log %s"
          % (wstest, url, ",".join(cases), ",".join(exclude) or "-", log_path), flush=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen([wstest, "-m", "fuzzingclient", "-s", spec_path],
                                    cwd=outdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return harness_error("cannot start wstest: %s" % e)
        try:
            rc, why = watch(proc, log_path, args.timeout, t0)
        except KeyboardInterrupt:
            kill_group(proc)
            raise
        if why:
            return harness_error(why, log_path)
    elapsed = time.monotonic() - t0

    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return harness_error("wstest exited %d after %.1f s without a readable report (%s)"
                             % (rc, elapsed, e), log_path)
    if rc != 0:
        print("autobahn: warning: wstest exited %d (report present, using it)" % rc, file=sys.stderr)

    results = index.get(args.agent)
    if results is None and len(index) == 1:
        results = next(iter(index.values()))
    if not results:
        with open(log_path, errors="replace") as f:
            m = re.search(r"^Connection to .* failed.*$", f.read(), re.M)
        if m:
            return harness_error("server not reachable: " + m.group(0), log_path)
        return harness_error("report has no cases for agent %r (patterns matched nothing?)" % args.agent,
                             log_path)

    beh_counts, close_counts = {}, {}
    failed = []
    for case_id in sorted(results, key=case_key):
        entry = results[case_id]
        b, c = entry.get("behavior", "?"), entry.get("behaviorClose", "?")
        beh_counts[b] = beh_counts.get(b, 0) + 1
        close_counts[c] = close_counts.get(c, 0) + 1
        if b not in PASS_VERDICTS or c not in PASS_VERDICTS:
            failed.append((case_id, b, c, entry))

    def fmt(counts):
        keys = sorted(counts, key=lambda k: (VERDICT_ORDER.index(k) if k in VERDICT_ORDER else 99, k))
        return ", ".join("%s %d" % (k, counts[k]) for k in keys)

    total = len(results)
    print("autobahn: %d cases in %.1f s against %s (agent %s); report %s"
          % (total, elapsed, url, args.agent, os.path.join(outdir, "index.html")))
    print("behavior:      " + fmt(beh_counts))
    print("behaviorClose: " + fmt(close_counts))
    if failed:
        print("not OK/INFORMATIONAL:")
        for case_id, b, c, entry in failed:
            line = "  %-9s behavior=%s behaviorClose=%s" % (case_id, b, c)
            det = read_case_details(outdir, entry)
            if det:
                line += " | %s | result: %s" % (one_line(det["description"], 200), one_line(det["result"], 200))
                if c not in PASS_VERDICTS and det.get("resultClose"):
                    line += " | close: %s" % one_line(det["resultClose"], 160)
            print(line)
    print("autobahn: %d passed, %d failed" % (total - len(failed), len(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
