"""The server's doors (glmkit.server_guard): Host, Origin, API key, exposure beyond loopback."""

import httpx
import pytest
import torch

from glmkit import cli, server_guard
from glmkit.engine import Engine
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.server import ServerThread, create_app
from glmkit.server_guard import (
    check_exposure,
    default_allowed_hosts,
    host_allowed,
    is_loopback,
    json_depth,
    key_matches,
    origin_allowed,
)

PAGE = "http://localhost:3000"
CHAT = {"messages": [{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyless():
    """A keyless server on loopback (the default set-up) that lets one web page in."""
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    engine = Engine(model, load_tokenizer(TRAINED_TINY_DIR), max_context=512)
    srv = ServerThread(create_app(engine, allowed_origins=[PAGE])).start()
    yield srv, engine
    srv.stop()
    engine.close()


def test_exposure_beyond_loopback_needs_a_key_or_a_loud_opt_in():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "myhost"))
    assert check_exposure("127.0.0.1", None) is None and check_exposure("0.0.0.0", "k") is None
    with pytest.raises(ValueError, match="--allow-unauthenticated"):
        check_exposure("0.0.0.0", None)
    assert "WITHOUT an API key" in check_exposure("0.0.0.0", None, allow_unauthenticated=True)


def test_glmkit_serve_refuses_before_loading(monkeypatch, capsys):
    monkeypatch.delenv("GLMKIT_API_KEY", raising=False)
    monkeypatch.setattr("glmkit.loading.load_model", lambda *a, **k: pytest.fail("loaded the model anyway"))
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    assert "no API key is set" in capsys.readouterr().err


def test_host_origin_and_key_rules():
    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("0.0.0.0", api_key="k") == ["*"]  # a key guards it; clients may use any name
    assert default_allowed_hosts("0.0.0.0") == ["localhost", "127.0.0.1", "::1"]  # no key: the operator names them
    loop = default_allowed_hosts("127.0.0.1")
    assert host_allowed("127.0.0.1:8000", loop) and host_allowed("[::1]:8000", loop) and host_allowed("LOCALHOST", loop)
    assert not host_allowed("attacker.example:8000", loop) and not host_allowed(None, loop)
    assert host_allowed("gpu1.lab.example", [".lab.example"]) and not host_allowed("lab.example.evil", [".lab.example"])
    assert origin_allowed(None, [], "localhost:8000")  # not a browser
    assert origin_allowed("http://localhost:8000", [], "localhost:8000")  # the server's own pages (/docs)
    assert not origin_allowed("https://evil.example", [], "localhost:8000")
    assert origin_allowed("http://localhost:3000/", [PAGE], "localhost:8000") and origin_allowed("x", ["*"], "h")
    assert key_matches("Bearer s3cret", "s3cret") and not key_matches("Bearer s3cre", "s3cret")
    assert not key_matches(None, "s3cret") and not key_matches("s3cret", "s3cret")
    assert json_depth(1) == 0 and json_depth([1]) == 1 and json_depth({"a": [{"b": []}]}) == 4


def test_the_api_key_is_compared_in_constant_time(monkeypatch):
    from glmkit.server import create_app as make

    calls = []
    real = server_guard.hmac.compare_digest
    monkeypatch.setattr(server_guard.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    from fastapi.testclient import TestClient

    app = make(engine=None, api_key="s3cret")  # the key check runs before any endpoint touches the engine
    r = TestClient(app, base_url="http://localhost").get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and calls


def test_dns_rebinding_host_is_refused(keyless):
    srv = keyless[0]
    r = httpx.post(srv.url + "/chat/completions", json=CHAT, headers={"Host": f"attacker.example:{srv.port}"})
    assert r.status_code == 400 and "--allowed-hosts attacker.example" in r.json()["error"]["message"]
    assert httpx.get(srv.url.replace("/v1", "/health"), headers={"Host": "rebind.example"}).status_code == 400
    assert httpx.post(srv.url + "/chat/completions", json=CHAT,
                      headers={"Host": f"localhost:{srv.port}"}).status_code == 200


def test_cross_origin_pages_are_refused_and_text_plain_too(keyless):
    srv, engine = keyless
    before = engine.batches_run
    # what a web page can send without a CORS preflight: a text/plain POST with its Origin
    r = httpx.post(srv.url + "/chat/completions", content=httpx.Request("POST", "/", json=CHAT).content,
                   headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "--allowed-origins https://evil.example" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/chat/completions", json=CHAT, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415  # even without an Origin header, JSON endpoints want JSON
    assert engine.batches_run == before  # none of them reached the model
    # an allowed page: the browser's preflight is answered, and the reply carries the CORS header
    pre = httpx.options(srv.url + "/chat/completions", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == PAGE
    r = httpx.post(srv.url + "/chat/completions", json=CHAT, headers={"Origin": PAGE})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE


def test_serve_flags_parse():
    args = cli.build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--allowed-hosts", "api.example",
                                          "--allowed-origins", PAGE, "--host", "0.0.0.0", "--allow-unauthenticated"])
    assert args.served_model_name == ["a", "b"] and args.allowed_hosts == ["api.example"]
    assert args.allowed_origins == [PAGE] and args.allow_unauthenticated
    assert cli.build_parser().parse_args(["serve", "--model-name", "x"]).served_model_name == ["x"]  # the old flag
