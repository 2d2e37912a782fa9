"""Options of the shipped testinfra suite (runs against any deployed host).

    pytest tests/testinfra --hosts=ssh://root@HOST [--ssh-config=FILE] [--llama-url=URL]

Expectations (unit, port, alias, key file) are read from the deploy manifest
the deploy writes to ``<llama_service.config_dir>/deploy.json`` (default
``/etc/llama-server/deploy.json``; ``--llama-manifest`` for another config_dir),
through the same typed reader the deploy writes with; nothing about the host has
to be repeated on the command line.
"""

from __future__ import annotations

import base64
import ipaddress
import shlex

import httpx
import pytest

from llamadeploy.manifest import DEFAULT_PATH, Manifest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--llama-url", default=None, help="base URL of the API (default: http://<host>:<port>)")
    parser.addoption("--llama-manifest", default=DEFAULT_PATH, help="deploy manifest path on the host")
    parser.addoption("--llama-log", default=None,
                     help="file on the host holding the server's log, for a server run outside systemd and docker")


@pytest.fixture(scope="module")
def manifest(host, request) -> Manifest:
    with host.sudo():
        return Manifest.parse(host.file(request.config.getoption("--llama-manifest")).content_string)


@pytest.fixture(scope="module")
def api_key(host, manifest) -> str | None:
    if not manifest.api_key_file:
        return None
    with host.sudo():
        return host.file(manifest.api_key_file).content_string.strip()


def url_host(address: str) -> str:
    """An address as it goes into a URL: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


@pytest.fixture(scope="module")
def through_host(manifest, request) -> bool:
    """A server bound to loopback answers only on its own host: the checks' HTTP goes through it
    (curl on the host), never to the controller's own loopback."""
    return request.config.getoption("--llama-url") is None and ipaddress.ip_address(manifest.host).is_loopback


@pytest.fixture(scope="module")
def base_url(host, manifest, request) -> str:
    url = request.config.getoption("--llama-url")
    if url:
        return url.rstrip("/")
    return server_url(manifest.host, host.backend.hostname, manifest.port)


def server_url(bind: str, ssh_hostname: str, port: int) -> str:
    """The server's URL as seen from here: its bind address, or the host's own address when it
    binds every address (``0.0.0.0``, ``::``); IPv6 in brackets."""
    addr = bind if bind not in ("0.0.0.0", "::") else ssh_hostname
    return f"http://{url_host(addr)}:{port}"


class ThroughHost(httpx.BaseTransport):
    """httpx's requests sent by curl on the host (testinfra's own connection to it).

    The real API key never reaches a command line there: a header carrying it is read from the
    key file on the host (``key_file``), as the deploy's own gate does; the body goes through a
    temporary file. The response is read whole (a stream arrives at once, complete).
    """

    def __init__(self, host, key: str | None, key_file: str | None):
        self.host, self.key, self.key_file = host, key, key_file

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        q = shlex.quote
        lines = []
        for name, value in request.headers.items():
            if name.lower() in ("host", "content-length", "connection", "accept-encoding"):
                continue
            if self.key and self.key_file and value == f"Bearer {self.key}":
                lines.append(f"{{ printf '%s' {q(name + ': Bearer ')}; cat {q(self.key_file)}; }}")
            else:
                lines.append(f"printf '%s\\n' {q(f'{name}: {value}')}")
        raw = request.read()
        data = "--data-binary @\"$b\" " if raw else ""
        cmd = (f"b=$(mktemp) && printf '%s' {q(base64.b64encode(raw).decode())} | base64 -d > \"$b\" && "
               f"{{ {'; '.join(lines) or 'true'}; }} | curl -s -i --max-time 120 -X {q(request.method)} -H 'Expect:' "
               f"-H @- {data}{q(str(request.url))}; rc=$?; rm -f \"$b\"; exit $rc")
        with self.host.sudo():
            out = self.host.run(cmd)
        if out.rc != 0:
            raise httpx.ConnectError(f"curl on the host exited {out.rc}: {out.stderr[-300:]}", request=request)
        head, _, content = out.stdout.replace("\r\n", "\n").partition("\n\n")
        status, *header_lines = head.split("\n")
        headers = [tuple(h.split(":", 1)) for h in header_lines if ":" in h]
        return httpx.Response(int(status.split()[1]), headers=[(k.strip(), v.strip()) for k, v in headers],
                              content=content.encode(), request=request)


@pytest.fixture
def http(host, base_url, through_host, api_key, manifest):
    """A client without the key, to ``base_url``, sent through the host when it serves on loopback."""
    transport = ThroughHost(host, api_key, manifest.api_key_file) if through_host else None
    with httpx.Client(base_url=base_url, timeout=120, transport=transport,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


@pytest.fixture
def api(host, base_url, api_key, through_host, manifest):
    """A client that sends the key when one is configured.

    One connection per request: llama-server sometimes closes a kept-alive
    connection right after a stream (see docs/testing.md, "Known behaviour"); this suite
    checks API behaviour, the benchmark counts that effect separately.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = ThroughHost(host, api_key, manifest.api_key_file) if through_host else None
    with httpx.Client(
        base_url=base_url, headers=headers, timeout=120, limits=httpx.Limits(max_keepalive_connections=0),
        transport=transport,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def server_pid(host, manifest) -> int:
    """The server's process id as the host sees it: the unit's main PID, the container's init
    process, or (a server run by hand) the process listening on the port."""
    with host.sudo():
        if manifest.mode == "docker":
            cid = host.check_output(f"docker ps -q --filter label=com.docker.compose.service={manifest.compose_service}")
            return int(host.check_output(f"docker inspect -f '{{{{.State.Pid}}}}' {shlex.quote(cid)}"))
        if manifest.unit:
            return int(host.check_output(f"systemctl show -p MainPID --value {shlex.quote(manifest.unit)}"))
        # by the binary the manifest names (/proc, so no ss or pidof is needed)
        out = host.check_output(
            f"for p in /proc/[0-9]*; do [ \"$(readlink $p/exe)\" = {shlex.quote(manifest.binary or '')} ] "
            "&& echo ${p#/proc/}; done; true")
    pids = out.split()
    assert pids, f"no process runs {manifest.binary}"
    return int(pids[0])


@pytest.fixture(scope="module")
def server_log(host, manifest, request) -> str:
    """What the server logged since its start (journal, container log, or --llama-log)."""
    with host.sudo():
        path = request.config.getoption("--llama-log")
        if path:
            return host.file(path).content_string
        if manifest.mode == "docker":
            return host.check_output(
                f"docker logs $(docker ps -q --filter label=com.docker.compose.service={manifest.compose_service}) 2>&1")
        unit = shlex.quote(manifest.unit or "")
        since = host.check_output(f"systemctl show -p ActiveEnterTimestamp --value {unit}")
        return host.check_output(f"journalctl -u {unit} --no-pager -o cat --since {shlex.quote(since)}")
