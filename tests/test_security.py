"""Exposure of the real tritonserver: loopback by default, gRPC over TLS and mutual TLS,
and the admin key that closes the model-repository and other admin APIs."""
from __future__ import annotations

import secrets
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
from fv2es_client.client import Fv2esClient, ServerUnreachable
from tritonclient.utils import InferenceServerException

from fv2es.serving import serve
from fv2es.serving.tritonserver import ADMIN_KEY_GRPC_HEADER, ADMIN_KEY_HEADER, GrpcTls, ServerFiles, TritonServer
from test_tritonserver import ECHO_CONFIG, ECHO_MODEL, add_model, bytes_input, make_server

ADMIN_KEY = "test-admin-key_0123"


# ---------------------------------------------------------------------------- certificates

def _openssl(*args) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(directory: Path, name: str, ca: tuple[Path, Path] | None = None,
           san: str | None = None) -> tuple[Path, Path]:
    """(certificate, key) in PEM: a self-signed CA when `ca` is None, else a leaf it signs."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
               "-subj", f"/CN={name}"]
    if ca is None:
        _openssl("req", "-x509", *new_key, "-days", "1", "-out", str(cert))
        return cert, key
    request, extensions = directory / f"{name}.csr", directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("req", "-new", *new_key, "-out", str(request))
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-set_serial", str(secrets.randbits(63)), "-days", "1", "-extfile", str(extensions),
             "-out", str(cert))
    return cert, key


@dataclass(frozen=True)
class Pki:
    server_ca: Path             # what clients trust
    server: tuple[Path, Path]   # (cert, key) for localhost / 127.0.0.1
    client_ca: Path             # what a mutual-TLS server trusts
    client: tuple[Path, Path]   # signed by client_ca
    stranger_ca: Path           # trusted by nobody
    stranger: tuple[Path, Path]  # a client certificate stranger_ca signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = (_issue(directory, name) for name in ("server-ca", "client-ca", "stranger-ca"))
    return Pki(server_ca=server_ca[0],
               server=_issue(directory, "localhost", server_ca, san="DNS:localhost,IP:127.0.0.1"),
               client_ca=client_ca[0], client=_issue(directory, "client", client_ca),
               stranger_ca=stranger_ca[0], stranger=_issue(directory, "stranger", stranger_ca))


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    add_model(root, "echo", ECHO_CONFIG, ECHO_MODEL)
    return root


def _echo(client: grpcclient.InferenceServerClient, text: bytes) -> bytes:
    return client.infer("echo", [bytes_input("TEXT", [text])]).as_numpy("ECHO")[0, 0]


def _ready(url: str, **tls) -> None:
    """The project's client's health check; raises ServerUnreachable when it cannot get in."""
    with Fv2esClient(url, model="echo", **tls) as client:
        client.wait_ready(timeout_s=0)


# ---------------------------------------------------------------------------- options, no server

FILES = ServerFiles(Path("bin/tritonserver"), Path("libs"), Path("backends"))


def test_serve_passes_address_tls_and_admin_key_to_tritonserver(monkeypatch, tmp_path, pki):
    made = []

    class NotStarted(TritonServer):
        def start(self, timeout=120.0):
            made.append(self)
            raise RuntimeError("not started in this test")

    monkeypatch.setattr(serve, "TritonServer", NotStarted)
    sigterm = signal.getsignal(signal.SIGTERM)     # main() installs its own handler
    try:
        assert serve.main(["--model-repository", str(tmp_path)]) == 1
        assert serve.main(["--model-repository", str(tmp_path), "--address", "0.0.0.0",
                           "--grpc-tls-cert", str(pki.server[0]), "--grpc-tls-key", str(pki.server[1]),
                           "--grpc-tls-client-ca", str(pki.client_ca), "--admin-key", ADMIN_KEY]) == 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)

    default, exposed = (server.command(FILES) for server in made)
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in default and f"{flag}=0.0.0.0" in exposed
    assert not any("ssl" in arg or "restricted" in arg for arg in default)
    assert {"--grpc-use-ssl=true", f"--grpc-server-cert={pki.server[0]}", f"--grpc-server-key={pki.server[1]}",
            "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={pki.client_ca}"} <= set(exposed)
    apis = f"model-repository,shared-memory,statistics,trace,logging:{ADMIN_KEY_HEADER}={ADMIN_KEY}"
    assert {f"--grpc-restricted-protocol={apis}", f"--http-restricted-api={apis}"} <= set(exposed)
    assert made[0].grpc_url.startswith("localhost:") and made[1].grpc_url.startswith("localhost:")


def test_bad_tls_and_admin_options_are_clear_errors(tmp_path, pki, capsys):
    missing = tmp_path / "missing.key"
    server = TritonServer(tmp_path, grpc_tls=GrpcTls(pki.server[0], missing))
    with pytest.raises(FileNotFoundError, match=f"gRPC TLS key file {missing} does not exist"):
        server.start()
    with pytest.raises(ValueError, match="admin_key must be"):
        TritonServer(tmp_path, admin_key="a,b:c=d")
    with pytest.raises(SystemExit):
        serve.main(["--model-repository", str(tmp_path), "--grpc-tls-key", str(pki.server[1])])
    assert "needs both --grpc-tls-cert and --grpc-tls-key" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real servers

def _listening(pid: int, ports) -> dict:
    """port -> the set of addresses the process listens on there. gRPC listens on IPv6
    sockets: ::ffff:127.0.0.1 is 127.0.0.1, and :: is every interface, IPv4 ones too."""
    found = {port: set() for port in ports}
    for connection in psutil.Process(pid).net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port in found:
            ip = connection.laddr.ip.removeprefix("::ffff:")
            found[connection.laddr.port].add("0.0.0.0" if ip == "::" else ip)
    return found


@pytest.mark.server
@pytest.mark.parametrize("address, expected", [(None, {"127.0.0.1"}), ("0.0.0.0", {"0.0.0.0"})])
def test_listens_on_loopback_unless_told_otherwise(tmp_path, address, expected):
    (tmp_path / "empty").mkdir()     # no models: the quickest start
    options = {} if address is None else {"address": address}
    with make_server(tmp_path / "empty", tmp_path / "server.log", **options) as server:
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        assert _listening(server.process.pid, ports) == {port: expected for port in ports}
        assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()
        with urllib.request.urlopen(f"http://{server.metrics_url}", timeout=10) as response:
            assert response.status == 200


@pytest.mark.server
def test_grpc_over_tls(repository, pki, tmp_path):
    tls = GrpcTls(*pki.server)
    with make_server(repository, tmp_path / "server.log", grpc_tls=tls) as server:
        _ready(server.grpc_url, ssl=True, root_certificates=pki.server_ca)
        client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki.server_ca))
        assert _echo(client, b"sealed") == b"echo:sealed"
        with pytest.raises(ServerUnreachable):      # plaintext against TLS
            _ready(server.grpc_url)
        with pytest.raises(InferenceServerException):
            grpcclient.InferenceServerClient(server.grpc_url).is_server_live()
        with pytest.raises(ServerUnreachable):      # a server certificate the client does not trust
            _ready(server.grpc_url, ssl=True, root_certificates=pki.stranger_ca)


@pytest.mark.server
def test_mutual_tls_admits_only_clients_the_client_ca_signed(repository, pki, tmp_path):
    tls = GrpcTls(*pki.server, client_ca=pki.client_ca)
    with make_server(repository, tmp_path / "server.log", grpc_tls=tls) as server:
        trust = {"ssl": True, "root_certificates": pki.server_ca}
        with pytest.raises(ServerUnreachable):      # no client certificate
            _ready(server.grpc_url, **trust)
        with pytest.raises(ServerUnreachable):      # one the client CA did not sign
            _ready(server.grpc_url, **trust, certificate_chain=pki.stranger[0], private_key=pki.stranger[1])
        _ready(server.grpc_url, **trust, certificate_chain=pki.client[0], private_key=pki.client[1])
        client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki.server_ca),
                                                  certificate_chain=str(pki.client[0]),
                                                  private_key=str(pki.client[1]))
        assert _echo(client, b"mutual") == b"echo:mutual"


def _http_post(server: TritonServer, path: str, headers=None) -> int:
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.server
def test_admin_key_guards_the_model_repository_not_inference(repository, tmp_path):
    server = make_server(repository, tmp_path / "server.log", model_control_mode="explicit", admin_key=ADMIN_KEY)
    grpc_key, http_key = {ADMIN_KEY_GRPC_HEADER: ADMIN_KEY}, {ADMIN_KEY_HEADER: ADMIN_KEY}
    with server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("echo")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("echo", headers={ADMIN_KEY_GRPC_HEADER: "wrong"})
        assert not client.is_model_ready("echo")
        client.load_model("echo", headers=grpc_key)
        assert _echo(client, b"open") == b"echo:open"       # inference needs no key
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_inference_statistics("echo")
        assert client.get_inference_statistics("echo", headers=grpc_key, as_json=True)["model_stats"]
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("echo")
        assert client.is_model_ready("echo")

        # The same over HTTP, where the header has no prefix.
        assert _http_post(server, "/v2/repository/models/echo/unload") == 403
        assert _http_post(server, "/v2/repository/models/echo/unload", grpc_key) == 403
        assert client.is_model_ready("echo")
        assert _http_post(server, "/v2/repository/models/echo/unload", http_key) == 200
        assert not client.is_model_ready("echo")
        assert _http_post(server, "/v2/repository/models/echo/load") == 403
        assert _http_post(server, "/v2/repository/models/echo/load", http_key) == 200
        assert _echo(client, b"again") == b"echo:again"
