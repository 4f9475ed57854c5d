#!/usr/bin/env python3
"""Failover of a `qadapt-run serve` fleet behind nginx, on loopback (bench/fleet.sh sets it up).

Starts REPLICAS servers on 127.0.0.1:BASE+1.. and nginx on 127.0.0.1:BASE in front of them, then for
DURATION seconds CLIENTS threads send score and chat requests (non-streamed) through nginx, one at a
time each, on keep-alive connections. Faults, at fixed times:
  KILL_AT   replica 1 gets SIGKILL (requests in flight on it die with their connections);
  DRAIN_AT  replica 2 gets SIGTERM: it stops accepting, answers what it holds and exits; it is then
            started again on the same port.
nginx retries a request on the next replica when a connection fails, a replica answers 502/503/504
or times out (`proxy_next_upstream … non_idempotent`), so no client should see a failure.

A client request fails on a status other than 200, a connection error or a timeout (60 s). Reports
requests served and failed, p50 / p99 latency before the first fault, between the faults and the
restart, and after, the time from the restarted replica's start until nginx sends it a request
(from nginx's access log), and how many requests each replica served. Writes JSON (--out); exit
status 0 when no request failed.

Standard library only.
"""

import argparse
import base64
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

QUESTIONS = ["Is it blurry?", "Describe the quality of this image.", "Is there noise in this image?"]


def nginx_conf(work, port, replicas, user_root):
    servers = "\n".join(f"    server 127.0.0.1:{port + i + 1} max_fails=1 fail_timeout=2s;" for i in range(replicas))
    tmp = f"{work}/nginx-tmp"
    return f"""{"user root;" if user_root else ""}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  log_format fleet '$msec|$status|$upstream_addr|$upstream_status|$request_time';
  access_log {work}/access.log fleet;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream qadapt {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 16m;
    location / {{
      proxy_pass http://qadapt;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 1s;
      proxy_read_timeout 60s;
      # A failed connection, a reset before the answer's header, or a 502/503/504 (a full queue, a
      # draining replica) moves the request to the next replica, POSTs included: a request no replica
      # answered has not been served, so sending it again serves it once.
      proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
      proxy_next_upstream_tries {replicas + 1};
      proxy_next_upstream_timeout 30s;
    }}
  }}
}}
"""


class Replica:
    def __init__(self, binary, export, port, log):
        self.binary, self.export, self.port, self.log = binary, export, port, log
        self.proc = None
        self.started = None

    def start(self):
        self.started = time.time()
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--model", self.export, "--host", "127.0.0.1", "--port", str(self.port),
             "--max-queue", "64", "--max-batch", "8", "--max-new-tokens", "64"],
            stdout=self.log, stderr=self.log)

    def ready(self, timeout=30.0):
        end = time.time() + timeout
        while time.time() < end:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/ready")
                if c.getresponse().status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qadapt-run", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--nginx", default="nginx")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--kill-at", type=float, default=15.0)
    ap.add_argument("--drain-at", type=float, default=30.0)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(f"{a.work}/nginx-tmp", exist_ok=True)
    log = open(f"{a.work}/replicas.log", "ab")
    reps = [Replica(a.qadapt_run, a.export, a.port + i + 1, log) for i in range(a.replicas)]
    for r in reps:
        r.start()
    for r in reps:
        if not r.ready():
            sys.exit(f"replica on port {r.port} did not become ready")
    conf = f"{a.work}/nginx.conf"
    with open(conf, "w") as f:
        f.write(nginx_conf(a.work, a.port, a.replicas, os.geteuid() == 0))
    nginx = subprocess.Popen([a.nginx, "-c", conf, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    # The clients start once nginx answers /ready through a replica.
    if not Replica(None, None, a.port, None).ready(timeout=10) or nginx.poll() is not None:
        sys.exit(f"nginx is not serving: see {a.work}/nginx-error.log")

    with open(a.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    bodies = [("/v1/score", json.dumps({"image": url}))] + [
        ("/v1/chat/completions", json.dumps({"model": "qadapt", "max_tokens": 24, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": q}]}]})) for q in QUESTIONS]
    results = []  # (start offset s, latency s, ok, what)
    lock = threading.Lock()
    t0 = time.time()
    stop_at = t0 + a.duration

    def client(k):
        conn = None
        i = k
        while time.time() < stop_at:
            path, body = bodies[i % len(bodies)]
            i += 1
            s = time.time()
            ok, what = False, ""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=60)
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200
                what = f"{r.status} {data[:120]!r}"
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every failure is counted, none ends the client
                what = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            with lock:
                results.append((s - t0, time.time() - s, ok, what))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.clients)]
    for t in threads:
        t.start()
    events = {}
    time.sleep(max(0.0, t0 + a.kill_at - time.time()))
    reps[0].proc.send_signal(signal.SIGKILL)
    events["kill"] = time.time() - t0
    time.sleep(max(0.0, t0 + a.drain_at - time.time()))
    reps[1].proc.send_signal(signal.SIGTERM)
    events["drain"] = time.time() - t0
    reps[1].proc.wait(timeout=120)
    events["drained_exit"] = time.time() - t0
    reps[1].start()
    events["restart"] = reps[1].started - t0
    reps[1].ready()
    events["restart_ready"] = time.time() - t0
    for t in threads:
        t.join(timeout=a.duration + 120)
    nginx.send_signal(signal.SIGQUIT)
    nginx.wait(timeout=30)
    for r in reps:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
            r.proc.wait(timeout=120)

    # nginx's view: which replica served what, and when the restarted one got its first request.
    served_by = {}
    first_after_restart = None
    retried = 0
    restarted = f"127.0.0.1:{reps[1].port}"
    with open(f"{a.work}/access.log") as f:
        for line in f:
            parts = line.strip().split("|")
            if len(parts) < 3:
                continue
            t, status, ups = float(parts[0]), parts[1], [u.strip() for u in parts[2].split(",")]
            served_by[ups[-1]] = served_by.get(ups[-1], 0) + (status == "200")
            retried += len(ups) > 1
            if restarted in ups and t - t0 >= events["restart"] and first_after_restart is None:
                first_after_restart = t - t0

    def phase(lo, hi):
        lat = sorted(r[1] for r in results if lo <= r[0] < hi and r[2])
        n_fail = sum(1 for r in results if lo <= r[0] < hi and not r[2])
        if not lat:
            return {"served": 0, "failed": n_fail}
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
        return {"served": len(lat), "failed": n_fail, "p50_ms": round(q(0.5), 1), "p99_ms": round(q(0.99), 1)}

    fails = [r for r in results if not r[2]]
    report = {
        "replicas": a.replicas,
        "clients": a.clients,
        "duration_s": a.duration,
        "events_s": {k: round(v, 3) for k, v in events.items()},
        "requests": len(results),
        "served": len(results) - len(fails),
        "failed": len(fails),
        "failures": [f"{r[0]:.2f}s {r[3]}" for r in fails[:20]],
        "phases": {
            "before (until the SIGKILL)": phase(0, events["kill"]),
            "during (SIGKILL, drain, restart)": phase(events["kill"], events["restart_ready"]),
            "after (restarted replica ready)": phase(events["restart_ready"], a.duration + 1),
        },
        "restart_to_first_request_s": None if first_after_restart is None
        else round(first_after_restart - events["restart"], 3),
        "restart_ready_s": round(events["restart_ready"] - events["restart"], 3),
        "served_by_replica": served_by,
        "requests_retried_by_nginx": retried,
    }
    print(f"| phase | served | failed | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for k, p in report["phases"].items():
        print(f"| {k} | {p['served']} | {p['failed']} | {p.get('p50_ms', '—')} | {p.get('p99_ms', '—')} |")
    print(f"\nrequests {report['requests']}, served {report['served']}, failed {report['failed']}; "
          f"nginx retried {retried} on another replica; events (s): {report['events_s']}")
    print(f"restarted replica: ready {report['restart_ready_s']} s after start, first request from nginx "
          f"{report['restart_to_first_request_s']} s after start; served per replica: {served_by}")
    for f in report["failures"]:
        print("failed:", f)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    sys.exit(0 if not fails else 1)


if __name__ == "__main__":
    main()
