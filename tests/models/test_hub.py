"""Published weights by name (fractal_models.hub, ``fractalgen download``): served from 127.0.0.1 only.

A tiny checkpoint is generated and served by a local HTTP server (Range requests, cut connections, refusals,
HTML pages); the URL table is pointed at it. A guard refuses every connection that is not to 127.0.0.1, so no
test here can touch the internet; servers stop with their test (and on a timer, whatever happens)."""
import hashlib
import http.server
import os
import socket
import threading

import pytest
import torch

from fractal_models import build_model, save_checkpoint
from fractal_models import hub
from fractal_models.checkpoint import CheckpointError
from fractal_models.cli import main

# the public code's util/download.py (LTH14/fractalgen), name -> link
PUBLIC_URLS = {
    "fractalar_in64": "https://www.dropbox.com/scl/fi/n25tbij7aqkwo1ypqhz72/checkpoint-last.pth?rlkey=2czevgex3ocg2ae8zde3xpb3f&st=mj0subup&dl=0",
    "fractalmar_in64": "https://www.dropbox.com/scl/fi/lh7fmv48pusujd6m4kcdn/checkpoint-last.pth?rlkey=huihey61ok32h28o3tbbq6ek9&st=fxtoawba&dl=0",
    "fractalmar_base_in256": "https://www.dropbox.com/scl/fi/zrdm7853ih4tcv98wmzhe/checkpoint-last.pth?rlkey=htq9yuzovet7d6ioa64s1xxd0&st=4c4d93vs&dl=0",
    "fractalmar_large_in256": "https://www.dropbox.com/scl/fi/y1k05xx7ry8521ckxkqgt/checkpoint-last.pth?rlkey=wolq4krdq7z7eyjnaw5ndhq6k&st=vjeu5uzo&dl=0",
    "fractalmar_huge_in256": "https://www.dropbox.com/scl/fi/t2rru8xr6wm23yvxskpww/checkpoint-last.pth?rlkey=dn9ss9zw4zsnckf6bat9hss6h&st=y7w921zo&dl=0",
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """No connection leaves the machine; the cache is the test's own folder."""
    real = socket.create_connection

    def guarded(address, *a, **k):
        if address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"test tried to reach {address}")
        return real(address, *a, **k)
    monkeypatch.setattr(socket, "create_connection", guarded)
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


class Server:
    """Serves ``files`` {path: bytes} on 127.0.0.1 with Range support. ``cut`` {path: n}: the first GET of
    that path announces the whole length and closes the connection after n bytes. ``status`` {path: code}:
    refuse. ``html``: paths served as text/html. ``requests`` logs (path, Range header)."""

    def __init__(self, files, cut=None, status=None, html=(), lifetime=60.0):
        self.files, self.cut, self.status, self.html = dict(files), dict(cut or {}), dict(status or {}), set(html)
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                outer.requests.append((path, self.headers.get("Range")))
                if path in outer.status:
                    self.send_error(outer.status[path])
                    return
                if path not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[path]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "text/html" if path in outer.html else "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if path in outer.cut:
                    body = body[:outer.cut.pop(path)]
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime, self.httpd.shutdown)  # a hung test cannot leave it running
        self.timer.daemon = True

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(bytes, state_dict) of a tiny_mar checkpoint in the reference layout."""
    torch.manual_seed(123)
    model = build_model("tiny_mar")
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    save_checkpoint(str(path), model, epoch=7)
    return path.read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}


def _register(monkeypatch, name, url, config="tiny_mar"):
    table = dict(hub.PRETRAINED)
    table[name] = hub.PretrainedWeights(config, url)
    monkeypatch.setattr(hub, "PRETRAINED", table)
    import fractal_models.cli as cli
    monkeypatch.setattr(cli, "PRETRAINED", table)


def test_published_names_resolve_to_the_public_codes_urls(tmp_path):
    assert set(hub.PRETRAINED) == set(PUBLIC_URLS)
    from fractal_models import CONFIG_NAMES
    assert set(CONFIG_NAMES) == set(PUBLIC_URLS)
    for name, url in PUBLIC_URLS.items():
        src = hub.resolve_source(name)
        assert src.url == url and src.config == name
        assert src.path == str(tmp_path / "cache" / name / "checkpoint-last.pth")
        assert src.headers["User-Agent"].startswith("Wget")  # what the public script sends Dropbox


def test_download_cut_resumed_checked_cached_and_loaded_strictly(monkeypatch, tiny_ckpt):
    data, state = tiny_ckpt
    cut = len(data) // 3
    with Server({"/tiny.pth": data}, cut={"/tiny.pth": cut}) as srv:
        _register(monkeypatch, "tiny_mar", srv.url + "/tiny.pth")
        src = hub.resolve_source("tiny_mar")
        # the connection is cut and no retry is allowed: one line, the partial file is kept for the next call
        with pytest.raises(hub.DownloadError) as e:
            hub.download_weights("tiny_mar", progress=False, retries=0)
        msg = str(e.value)
        assert "\n" not in msg and srv.url + "/tiny.pth" in msg and src.path in msg and "resumes" in msg
        assert os.path.getsize(src.path + ".part") == cut and not os.path.exists(src.path)
        # the next call resumes with a Range request from where the cut left it
        path = hub.download_weights("tiny_mar", progress=False)
        assert srv.requests == [("/tiny.pth", None), ("/tiny.pth", f"bytes={cut}-")]
        assert path == src.path and open(path, "rb").read() == data and not os.path.exists(path + ".part")
        meta = __import__("json").load(open(path + ".meta.json"))
        assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest()
        # cached: loading by name makes no request, checks the file and loads strictly with weights_only
        model = hub.from_pretrained("tiny_mar", progress=False)
        assert len(srv.requests) == 2
        assert not model.training
        got = model.state_dict()
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_a_cut_connection_is_resumed_within_one_call(monkeypatch, tiny_ckpt):
    data, _ = tiny_ckpt
    with Server({"/w.pth": data}, cut={"/w.pth": 1000}) as srv:
        _register(monkeypatch, "tiny_mar", srv.url + "/w.pth")
        path = hub.download_weights("tiny_mar", progress=False)
        assert open(path, "rb").read() == data
        assert srv.requests == [("/w.pth", None), ("/w.pth", "bytes=1000-")]


def test_corrupted_or_truncated_cache_is_detected_and_force_repairs_it(monkeypatch, tiny_ckpt):
    data, _ = tiny_ckpt
    with Server({"/w.pth": data}) as srv:
        _register(monkeypatch, "tiny_mar", srv.url + "/w.pth")
        path = hub.download_weights("tiny_mar", progress=False)
        raw = bytearray(data)
        raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte
        open(path, "wb").write(bytes(raw))
        with pytest.raises(hub.DownloadError, match="corrupt") as e:
            hub.from_pretrained("tiny_mar", progress=False)
        assert path in str(e.value) and "--force" in str(e.value) and "\n" not in str(e.value)
        open(path, "wb").write(data[:-10])
        with pytest.raises(hub.DownloadError, match="damaged"):
            hub.download_weights("tiny_mar", progress=False)
        assert len(srv.requests) == 1  # a bad cache is reported, never silently replaced
        hub.download_weights("tiny_mar", progress=False, force=True)
        assert open(path, "rb").read() == data
        hub.from_pretrained("tiny_mar", progress=False)


def test_wrong_config_is_refused(monkeypatch, tiny_ckpt):
    data, _ = tiny_ckpt
    with Server({"/w.pth": data}) as srv:
        _register(monkeypatch, "tiny_ar", srv.url + "/w.pth", config="tiny_ar")  # the table claims another config
        with pytest.raises(CheckpointError, match="does not match the model"):
            hub.from_pretrained("tiny_ar", progress=False)
        with pytest.raises(CheckpointError, match="does not match the model"):
            hub.from_pretrained(srv.url + "/w.pth", config="tiny_mar_gp", progress=False)
        hub.from_pretrained(srv.url + "/w.pth", config="tiny_mar", progress=False)  # a URL with its config
        # the CLI: one line, exit status 2
        assert main(["sample", "--config", "tiny_ar", "--quiet", "--output", os.devnull]) == 2


def test_refused_offline_and_html_are_one_line_naming_url_and_cache(monkeypatch, capsys, tiny_ckpt):
    data, _ = tiny_ckpt
    with Server({"/page": b"<html>sign in</html>"}, status={"/gone.pth": 403}, html={"/page"}) as srv:
        for path, why in (("/gone.pth", "HTTP 403"), ("/page", "HTML page")):
            _register(monkeypatch, "tiny_mar", srv.url + path)
            with pytest.raises(hub.DownloadError, match=why) as e:
                hub.download_weights("tiny_mar", progress=False)
            assert srv.url + path in str(e.value) and hub.resolve_source("tiny_mar").path in str(e.value)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: offline
    _register(monkeypatch, "tiny_mar", f"http://127.0.0.1:{port}/w.pth")
    assert main(["download", "tiny_mar", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fractalgen: error: could not download 'tiny_mar'")
    assert f"http://127.0.0.1:{port}/w.pth" in err[0] and hub.resolve_source("tiny_mar").path in err[0]
    assert not os.path.exists(hub.resolve_source("tiny_mar").path)


def test_hugging_face_ids_and_urls(monkeypatch, tiny_ckpt, tmp_path):
    data, state = tiny_ckpt
    src = hub.resolve_source("hf://someone/fractalgen-weights")
    assert src.url == "https://huggingface.co/someone/fractalgen-weights/resolve/main/checkpoint-last.pth"
    src = hub.resolve_source("someone/fractalgen-weights/in64/model.pth")
    assert src.url == "https://huggingface.co/someone/fractalgen-weights/resolve/main/in64/model.pth"
    with pytest.raises(ValueError, match="name_or_url"):
        hub.resolve_source("not a name")
    with Server({"/someone/w/resolve/main/checkpoint-last.pth": data}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        model = hub.from_pretrained("hf://someone/w", config="tiny_mar", progress=False)
        assert torch.equal(model.state_dict()["class_emb.weight"], state["class_emb.weight"])
        assert os.path.isfile(tmp_path / "cache" / "hf" / "someone--w" / "checkpoint-last.pth")
    local = tmp_path / "local.pth"
    local.write_bytes(data)
    hub.from_pretrained(str(local), config="tiny_mar")  # a path is used in place


def test_cli_download_all_and_sample_without_checkpoint_uses_the_cached_weights(monkeypatch, capsys, tiny_ckpt,
                                                                               tmp_path):
    data, _ = tiny_ckpt
    with Server({"/w.pth": data}) as srv:
        table = {"tiny_mar": hub.PretrainedWeights("tiny_mar", srv.url + "/w.pth")}
        monkeypatch.setattr(hub, "PRETRAINED", table)
        import fractal_models.cli as cli
        monkeypatch.setattr(cli, "PRETRAINED", table)
        assert main(["download", "all", "--quiet"]) == 0
        path = hub.resolve_source("tiny_mar").path
        assert f"tiny_mar: {path}" in capsys.readouterr().out
        out_a, out_b = tmp_path / "a.png", tmp_path / "b.png"
        argv = ["--labels", "1,2", "--num-iter-list", "2,2", "--backend", "torch", "--quiet"]
        assert main(["sample", "--config", "tiny_mar", "--output", str(out_a), *argv]) == 0
        assert f"from {path}" in capsys.readouterr().out
        assert len(srv.requests) == 1  # the cached file, not a second download
        assert main(["sample", "--config", "tiny_mar", "--checkpoint", path, "--output", str(out_b), *argv]) == 0
        assert out_a.read_bytes() == out_b.read_bytes()
        assert main(["sample", "--config", "tiny_mar", "--random-init", "--output", str(out_b), *argv]) == 0
        assert "randomly initialised" in capsys.readouterr().out
