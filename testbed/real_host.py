"""Running the real text-generation-webui around this extension, for the real-host tests.

``LLAVA_WEBUI_PATH`` names a webui checkout and ``LLAVA_WEBUI_PYTHON`` its Python (both printed by
the hosts' ``prepare.sh``). Each server gets its own copy of the checkout's ``user_data`` (saved
chats, settings) with the extension linked in as ``user_data/extensions/NAME``, exactly where a
user installs it, so servers never see each other's chats and the checkout is left untouched.
A 2023 checkout has no ``user_data``: the extension is linked into its ``extensions`` folder.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

WEBUI = os.environ.get("LLAVA_WEBUI_PATH")
PYTHON = os.environ.get("LLAVA_WEBUI_PYTHON", sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSION = os.path.join(ROOT, "extensions", "llava")

needs_webui = pytest.mark.skipif(not WEBUI, reason="no real webui: set LLAVA_WEBUI_PATH and LLAVA_WEBUI_PYTHON "
                                                   "(the hosts' prepare.sh prints both)")


def is_current(webui: str) -> bool:
    return os.path.isfile(os.path.join(webui, "modules", "api", "script.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body=None, headers: dict | None = None, method: str | None = None, timeout: float = 300):
    """(status, headers, body bytes) of one HTTP request; a JSON body is sent as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if data is not None and not isinstance(body, bytes) else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 300):
    """(status, parsed JSON) of a JSON POST."""
    status, _, raw = request(url, body, headers, timeout=timeout)
    return status, json.loads(raw or b"null")


class Server:
    def __init__(self, base: str, log: str, current: bool, process: subprocess.Popen, user_data: str | None):
        self.base, self.log, self.current, self.process, self.user_data = base, log, current, process, user_data

    def log_text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def count(self, line: str) -> int:
        return self.log_text().count(line)

    def wait_for_count(self, line: str, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.count(line) < count:
            if time.time() > deadline or self.process.poll() is not None:
                raise AssertionError(f"the server log never had {count} × {line!r}:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        """The server's resident memory now, in MB."""
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def encoded(self) -> list[int]:
        """The length of each text the webui's ``encode`` received so far (with ``probe_encode``)."""
        if not os.path.exists(self.probe_log):
            return []
        with open(self.probe_log) as f:
            return [int(line) for line in f if line.strip()]

    def __getitem__(self, key):  # the older tests read server["base"] and server["current"]
        return getattr(self, key)


def install_link(target: str, link: str) -> None:
    """``link`` pointing at ``target``, replacing another copy installed there."""
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        shutil.rmtree(link) if os.path.isdir(link) and not os.path.islink(link) else os.unlink(link)
    os.symlink(target, link)


def webui_tree_with_extension(work_dir: str) -> str:
    """A webui root as a user has it after installing the extension: the checkout's files linked in, a
    ``user_data`` of its own holding a copy of the extension in ``user_data/extensions/llava`` (the checkout
    is left untouched). Returns the root."""
    root = os.path.join(work_dir, "webui")
    os.makedirs(os.path.join(root, "user_data", "extensions"))
    for name in os.listdir(WEBUI):
        if name != "user_data":
            os.symlink(os.path.join(WEBUI, name), os.path.join(root, name))
    shutil.copytree(EXTENSION, os.path.join(root, "user_data", "extensions", "llava"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def current_webui_arguments(work_dir: str, ui: bool, api: bool, probe_encode: bool):
    """Arguments for today's webui (its own user_data copied into ``work_dir``) and its UI and API ports."""
    user_data = os.path.join(work_dir, "user_data")
    if not os.path.isdir(user_data):
        shutil.copytree(os.path.join(WEBUI, "user_data"), user_data, symlinks=True,
                        ignore=shutil.ignore_patterns("models", "logs", "cache"))
    install_link(EXTENSION, os.path.join(user_data, "extensions", "llava"))
    extensions = ["llava"]
    if probe_encode:
        probe = os.path.join(user_data, "extensions", "encode_probe")
        if not os.path.lexists(probe):
            os.symlink(os.path.join(ROOT, "testbed", "encode_probe"), probe)
        extensions.append("encode_probe")
    arguments = ["--user-data-dir", user_data, "--loader", "transformers", "--extensions", *extensions]
    ui_port, api_port = free_port(), free_port()
    if api:
        arguments += ["--api", "--api-port", str(api_port)]
    arguments += ["--listen-port", str(ui_port)] if ui else ["--nowebui"]
    return arguments, user_data, ui_port, api_port


def wait_until_ready(server: "Server", port: int, ui: bool) -> None:
    """Until the UI says it runs (``ui``) or the port takes connections; the test fails if the server stops."""
    deadline = time.time() + 300
    while time.time() < deadline and server.process.poll() is None:
        if ui:
            if "Running on local URL" in server.log_text():
                return
        else:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                pass
        time.sleep(0.5)
    pytest.fail("the webui did not start:\n" + server.log_text()[-4000:])


@contextlib.contextmanager
def running_webui(models: str, model: str, work_dir: str, *, ui: bool = False, api: bool = True,
                  extra_args: tuple = (), env: dict | None = None, log_name: str = "server.log",
                  probe_encode: bool = False):
    """server.py with this extension, serving ``model`` from ``models``, its log and user data in
    ``work_dir`` (a second server in the same ``work_dir`` finds the first one's saved chats);
    stopped after. ``probe_encode`` also installs testbed/encode_probe, which records the length of every
    text the webui tokenizes (``Server.encoded()``)."""
    current = is_current(WEBUI)
    user_data = None
    command = [PYTHON, "server.py", "--cpu", "--model-dir", str(models), "--model", model]
    if current:
        arguments, user_data, ui_port, api_port = current_webui_arguments(work_dir, ui, api, probe_encode)
    else:
        link = os.path.join(WEBUI, "extensions", "llava_under_test")
        if os.path.lexists(link):
            pytest.skip(f"{link} already exists; remove it to run this test")
        os.symlink(EXTENSION, link)
        ui_port, api_port = free_port(), 5000
        arguments = ["--extensions", "llava_under_test", "--api", "--listen-port", str(ui_port)]
    command += arguments + list(extra_args)
    log_path = os.path.join(work_dir, log_name)
    log = open(log_path, "w")
    probe_log = os.path.join(work_dir, log_name + ".encoded")
    process = subprocess.Popen(command, cwd=WEBUI, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "LLAVA_ENCODE_PROBE_LOG": probe_log,
                                    **(env or {})})
    port = ui_port if ui else api_port
    server = Server(f"http://127.0.0.1:{port}", log_path, current, process, user_data)
    server.probe_log = probe_log
    server.api_base = f"http://127.0.0.1:{api_port}"
    try:
        wait_until_ready(server, port, ui)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        if not current:
            os.unlink(link)
