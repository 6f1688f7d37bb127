"""Run the real Triton Inference Server 2.51 on this machine, without a container.

The server, its python backend and one python backend stub per Python version ship inside
the `nvidia-pytriton` wheel; we take only those files (installing the wheel would pin
numpy<2). The stub embeds the first `python3` on PATH and runs it isolated (PYTHONPATH is
ignored), so we put this interpreter's bin folder first: model.py files then import
numpy, onnxruntime and fv2es from the project's environment.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fv2es.assets import cache_dir, extract_wheel

PYTRITON_WHEEL = ("nvidia-pytriton", "0.7.0")
MODEL_CONTROL_MODES = ("none", "explicit")
# With an admin key, these API groups answer only requests that carry the key in a header;
# Triton's gRPC server expects its own prefix on the metadata key. Health, metadata,
# model-config and inference stay open: clients and perf_analyzer need them.
ADMIN_KEY_HEADER = "fv2es-admin-key"
ADMIN_KEY_GRPC_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_HEADER
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
# Error lines every start-up logs on a machine without CUDA; they are harmless.
_CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "unable to create stream for")


@dataclass(frozen=True)
class ServerFiles:
    binary: Path        # bin/tritonserver
    libs: Path          # the wheel's bundled shared libraries
    backends: Path      # for --backend-directory: python/ with the stub for this Python


@dataclass(frozen=True)
class GrpcTls:
    """Serve gRPC over TLS: PEM files of the server's certificate (chain) and key. With
    client_ca, only clients presenting a certificate that CA signed get in (mutual TLS)."""
    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"gRPC TLS {what} file {path} does not exist")

    def args(self) -> list[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.cert).resolve()}",
                f"--grpc-server-key={Path(self.key).resolve()}"]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(self.client_ca).resolve()}"]
        return args


def server_files() -> ServerFiles:
    """Extract the server from the wheel once and build the backend folder for this Python."""
    name, version = PYTRITON_WHEEL
    extract_wheel(name, version, "pytriton/tritonserver/")
    root = extract_wheel(name, version, "nvidia_pytriton.libs/")
    server = root / "pytriton" / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        found = sorted(p.name for p in (server / "python_backend_stubs").iterdir())
        raise RuntimeError(f"{name} {version} has no python backend stub for Python {py} (it has {', '.join(found)})")
    if ctypes.util.find_library(f"python{py}") is None:
        raise RuntimeError(f"the Triton python backend stub needs libpython{py}.so.1.0, which is not installed "
                           f"(Debian/Ubuntu: apt-get install libpython{py})")
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        # The 2.51 stub's BYTES deserialisation aborts under numpy 2 ("Stub process is not healthy").
        raise RuntimeError(f"the Triton 2.51 python backend needs numpy<2 in {sys.prefix}, "
                           f"found {numpy.__version__}: pip install 'numpy<2'")
    backends = cache_dir() / "triton" / f"backends-py{py}"
    if not (backends / "python" / "triton_python_backend_stub").exists():
        _build_backends(backends, server / "backends" / "python", stub)
    return ServerFiles(server / "bin" / "tritonserver", root / "nvidia_pytriton.libs", backends)


def _build_backends(target: Path, python_backend: Path, stub: Path) -> None:
    # Built aside and renamed into place: parallel test runs may race to build it.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    shutil.copytree(python_backend, staging / "python")
    shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
    try:
        staging.rename(target)
    except OSError:         # another process finished first
        shutil.rmtree(staging)


def server_env(files: ServerFiles) -> dict:
    """The environment the server and its python stubs need."""
    env = dict(os.environ)
    # The stub embeds whichever libpython the loader finds first: put this interpreter's own
    # first, or a system libpython of another patch release runs our standard library
    # (seen: importing transformers fails with "_ssl: undefined symbol _PyModule_Add").
    own_libpython = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [own_libpython, str(files.libs),
                                                           env.get("LD_LIBRARY_PATH")]))
    bindir = Path(sys.executable).parent
    if not (bindir / "python3").exists():
        raise RuntimeError(f"the python stub runs the first python3 on PATH, but {bindir} has none; "
                           "run from a virtual environment")
    env["PATH"] = os.pathsep.join(filter(None, [str(bindir), env.get("PATH")]))
    return env


def _terminate_with_parent() -> None:
    # Runs in the child before exec: if the process that started the server dies without
    # stop() (a crash, kill -9), the kernel sends the server SIGTERM instead of orphaning it.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_ports(count: int) -> list[int]:
    """COUNT loopback ports free at this moment (for servers started by tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _local_host(address: str) -> str:
    """The address a client on this machine dials to reach a server bound to ADDRESS."""
    return "127.0.0.1" if address == "0.0.0.0" else address


def _check_port_free(address: str, port: int) -> None:
    # Otherwise the readiness check could be answered by whatever already listens there.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as error:
            raise RuntimeError(f"port {port} on {address} is taken ({error.strerror}): is another server "
                               "running? Choose other ports") from None


class TritonServer:
    """One tritonserver process. Use as a context manager, or start()/stop().

    log_file=None lets the server write to this terminal; otherwise its stdout and stderr
    (python models' prints included) go to that file. auto_complete_config is off by
    default: our configs are complete, and asking every python model to complete its
    config is most of the start-up time.

    HTTP, gRPC and metrics listen on `address`: loopback unless told otherwise ("0.0.0.0":
    every interface). grpc_tls serves gRPC over TLS (Triton 2.51 has no TLS for HTTP);
    admin_key closes ADMIN_APIS to requests without the key (in ADMIN_KEY_HEADER over HTTP,
    ADMIN_KEY_GRPC_HEADER over gRPC).
    """

    def __init__(self, model_repository, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, address: str = "127.0.0.1", grpc_tls: GrpcTls | None = None,
                 admin_key: str | None = None, model_control_mode: str = "none", load_models=(),
                 log_file=None, log_verbose: int = 0, auto_complete_config: bool = False,
                 extra_args=()):
        # The key goes into Triton's "<apis>:<header>=<key>" flag and into headers: a plain token
        # survives both intact.
        if admin_key is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", admin_key):
            raise ValueError("admin_key must be letters, digits and '.', '_', '~', '-' only")
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {MODEL_CONTROL_MODES}, not {model_control_mode!r}")
        if load_models and model_control_mode != "explicit":
            raise ValueError("load_models needs model_control_mode='explicit'")
        self.model_repository = Path(model_repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.grpc_tls = grpc_tls
        self.admin_key = admin_key
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.auto_complete_config = auto_complete_config
        self.extra_args = tuple(extra_args)
        # Python backend shared-memory regions are files /dev/shm/<prefix>*; a unique
        # prefix lets several servers share a machine and lets stop() remove leftovers.
        self.shm_prefix = f"fv2es_{os.getpid()}_{grpc_port}_"
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        """The host in our URLs: "localhost" for loopback, the name a local TLS certificate carries."""
        host = _local_host(self.address)
        return "localhost" if host == "127.0.0.1" else host

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.host}:{self.metrics_port}/metrics"

    def command(self, files: ServerFiles) -> list[str]:
        cmd = [str(files.binary),
               f"--model-repository={self.model_repository}",
               f"--backend-directory={files.backends}",
               f"--http-address={self.address}",
               f"--grpc-address={self.address}",
               f"--metrics-address={self.address}",
               f"--http-port={self.http_port}",
               f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}",
               f"--model-control-mode={self.model_control_mode}",
               f"--log-verbose={self.log_verbose}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        cmd += [f"--load-model={name}" for name in self.load_models]
        if self.grpc_tls is not None:
            cmd += self.grpc_tls.args()
        if self.admin_key is not None:
            restricted = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}"
            cmd += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        if not self.auto_complete_config:
            cmd.append("--disable-auto-complete-config")
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Start the server and wait until it (and every loaded model) is ready."""
        if self.is_alive():
            raise RuntimeError("this server is already running")
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        if self.grpc_tls is not None:
            self.grpc_tls.check()
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            _check_port_free(self.address, port)
        files = server_files()
        out = None
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "wb")
        try:
            # Own session: Ctrl-C in a terminal reaches us, not the server, so stop()
            # decides how it ends; killpg reaches the python stubs too.
            self.process = subprocess.Popen(self.command(files), env=server_env(files), stdout=out,
                                            stderr=subprocess.STDOUT if out else None,
                                            start_new_session=True, preexec_fn=_terminate_with_parent)
        finally:
            if out:
                out.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode} "
                                   f"before it was ready{self._log_excerpt()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s{self._log_excerpt()}")

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        """Server ready: in mode 'none' that means every model in the repository loaded."""
        if not self.is_alive():
            return False
        try:
            url = f"http://{_local_host(self.address)}:{self.http_port}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server finishes in-flight requests and unloads models), then SIGKILL.

        Returns the server's exit status, None when it was not started.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:    # the server, and any python stub it left behind
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        status = self.process.wait()
        for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
            region.unlink(missing_ok=True)
        return status

    def _log_excerpt(self) -> str:
        if not self.log_file:
            return " (see the server log above)"
        # The cause is usually an error line far above the shutdown messages at the end.
        lines = self.log_file.read_text(errors="replace").splitlines()
        errors = [line for line in lines if (re.match(r"E\d{4} ", line) or "UNAVAILABLE" in line)
                  and not any(noise in line for noise in _CPU_ONLY_NOISE)]
        return (f"; errors in {self.log_file}:\n" + "\n".join(errors)
                + "\nlast lines:\n" + "\n".join(lines[-15:]))

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
