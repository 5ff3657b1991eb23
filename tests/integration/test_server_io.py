"""How the server writes to its sockets (server.io): io_uring submissions or writev.

Three daemons watch the same collection, one forced to io_uring (`io: uring`), one forced to the
writev fallback (`io: writev`), both with one thread (`threads: 1`), and one with io_uring on two
send threads (`threads: 2`, the send pool); their WebSocket subscribers (some reading at once, one with a
tiny receive buffer that stops reading while large changes pile up, so that sends are cut
short) must receive exactly the same frames, byte for byte. /metrics and the start-up log say
which way each daemon writes. Skipped where the kernel refuses io_uring (then `auto` chose
writev, which the last test checks instead).

Runs `mongocast run` against the emulator (or MONGODB_URI).
"""

import time

import pytest

from daemon_util import *  # noqa: F401,F403
from server_util import RawWS, metrics, server_config, start_server, stream


def io_daemon(tmp_path, daemons, mongo_uri, db_name, io, threads=1):
    name = "%s-t%d" % (io, threads)
    cfg = server_config(tmp_path / ("%s.yaml" % name), mongo_uri,
                        {"fan": stream(db_name, "fan")}, server={"io": io, "threads": threads},
                        checkpoint_dir=tmp_path / ("cp-%s" % name))
    saved = daemons

    def start(config):
        return saved(config, name="mongocast-%s" % name)
    return start_server(start, cfg)


def uring_available(tmp_path, daemons, mongo_uri, db_name):
    d, port = io_daemon(tmp_path, daemons, mongo_uri, db_name, "auto")
    mode = metrics(port).get('mongocast_server_io{mode="uring"}')
    d.stop()
    return mode == 1


def frames(ws, n_changes, deadline):
    """The next frames of `ws` (opcode, payload) up to its n-th change message; pings are
    answered and left out (their timing is not the daemon's bytes)."""
    out = []
    seen = 0
    while seen < n_changes:
        assert time.monotonic() < deadline, "only %d of %d changes arrived" % (seen, n_changes)
        fin, op, payload = ws.recv_frame()
        assert fin
        if op in (0x9, 0xA):
            continue
        out.append((op, payload))
        if op == 0x1 and payload.startswith(b'{"type":"change"'):
            seen += 1
    return out


def test_uring_and_writev_send_identical_frames(tmp_path, daemons, mongo_uri, db, db_name):
    if not uring_available(tmp_path, daemons, mongo_uri, db_name):
        pytest.skip("the kernel refuses io_uring here (server.io auto chose writev)")
    du, pu = io_daemon(tmp_path, daemons, mongo_uri, db_name, "uring")
    dw, pw = io_daemon(tmp_path, daemons, mongo_uri, db_name, "writev")
    dp, pp = io_daemon(tmp_path, daemons, mongo_uri, db_name, "uring", threads=2)
    assert "socket writes: io_uring, up to" in du.stderr_text()
    assert "socket writes: writev (server.io: writev)" in dw.stderr_text()
    assert "socket writes: io_uring on 2 send threads" in dp.stderr_text()

    subs = {}
    for name, port in (("uring", pu), ("writev", pw), ("pool", pp)):
        fast = [RawWS(port, "/v1/streams/fan") for _ in range(3)]
        slow = RawWS(port, "/v1/streams/fan", rcvbuf=4096)
        for ws in fast + [slow]:
            assert ws.status == 101
            assert ws.recv_json() == {"type": "ready", "stream": "fan"}
        subs[name] = (fast, slow)

    # Small and large changes (up to ~300 KiB of JSON), so that one send often does not fit
    # the slow reader's socket; it reads nothing until everything was written.
    n = 40
    for i in range(n):
        size = (i * 7919) % 300000 if i % 4 == 0 else 50 + i
        db.fan.insert_one({"_id": i, "i": i, "pad": "x%d" % i * (size // 3 + 1)})
    deadline = time.monotonic() + 60
    got = {}
    for name, (fast, slow) in subs.items():
        got[name] = [frames(ws, n, deadline) for ws in fast]
        time.sleep(0.2)
        got[name].append(frames(slow, n, deadline))
    # Same change events (same resume tokens) through two write paths: same bytes.
    for i in range(4):
        assert len(got["uring"][i]) == len(got["writev"][i]) == len(got["pool"][i]) == n
        assert got["uring"][i] == got["writev"][i] == got["pool"][i]
    assert [p for _, p in got["uring"][0]] == [p for _, p in got["uring"][3]]

    mu, mw, mp = metrics(pu), metrics(pw), metrics(pp)
    assert mp['mongocast_server_io{mode="uring"}'] == 1
    assert mp["mongocast_server_threads"] == 2
    assert 0 < sum(v for k, v in mp.items() if k.startswith("mongocast_send_thread_sends_total")) \
        <= mp['mongocast_socket_sends_total{path="uring"}']
    assert mu['mongocast_server_io{mode="uring"}'] == 1
    assert 'mongocast_server_io{mode="writev"}' not in mu
    assert mu['mongocast_socket_sends_total{path="uring"}'] > 0
    assert 0 < mu["mongocast_io_uring_submits_total"] <= mu[
        'mongocast_socket_sends_total{path="uring"}']
    assert mw['mongocast_server_io{mode="writev"}'] == 1
    assert mw['mongocast_socket_sends_total{path="uring"}'] == 0
    assert mw["mongocast_io_uring_submits_total"] == 0
    assert mw['mongocast_socket_sends_total{path="writev"}'] > 0
    for m in (mu, mw, mp):
        assert m["mongocast_slow_consumer_disconnects_total"] == 0
    for name, (fast, slow) in subs.items():
        for ws in fast + [slow]:
            ws.close()


def test_auto_logs_and_shows_its_choice(tmp_path, daemons, mongo_uri, db_name):
    d, port = io_daemon(tmp_path, daemons, mongo_uri, db_name, "auto")
    m = metrics(port)
    modes = [k for k in m if k.startswith("mongocast_server_io{")]
    assert len(modes) == 1 and m[modes[0]] == 1
    err = d.stderr_text()
    if modes[0] == 'mongocast_server_io{mode="uring"}':
        assert "socket writes: io_uring, up to" in err and "(server.io: auto)" in err
    else:
        assert "socket writes: writev, io_uring is not available here" in err
    d2, port2 = io_daemon(tmp_path, daemons, mongo_uri, db_name, "auto", threads=2)
    err2 = d2.stderr_text()
    if modes[0] == 'mongocast_server_io{mode="uring"}':
        assert "socket writes: io_uring on 2 send threads" in err2 and "(server.io: auto" in err2
    else:
        assert "socket writes: sendmsg on 2 send threads, io_uring is not available" in err2
    assert metrics(port2)[modes[0]] == 1


def test_bad_io_value_is_a_config_error(tmp_path, mongo_uri, db_name):
    cfg = server_config(tmp_path / "bad.yaml", mongo_uri, {"fan": stream(db_name, "fan")},
                        server={"io": "fast"})
    r = run_cli("check", "-c", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "io" in out and "fast" in out and "uring" in out and "writev" in out, out
