"""No secret on a command line (``/proc/<pid>/cmdline`` is readable by every local user): redis-server
takes a password from a config file of mode 0600, tritonserver its admin key from the environment through
``stack/argv_secret.c``; both still enforce them."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from tritonclient import http as httpclient
from tritonclient.utils import InferenceServerException

from export.model_repository import render_profile_repository
from export.triton_config import ranker_models
from stack.redis_local import CONFIG_FILE, start_server
from stack.triton_launcher import ADMIN_KEY_PLACEHOLDER, TritonServer, argv_secret_shim
from tests.conftest import Exported
from tests.redis_harness import require_redis

pytestmark = pytest.mark.integration


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_the_redis_password_is_in_a_private_file_not_the_command_line() -> None:
    require_redis()
    password = "cmdline-pw-7d3e1b9a"
    server = start_server(config=("user default off", f"user app on >{password} ~* &* +@all"))
    try:
        assert password not in cmdline(server.process.pid)
        secret_file = server.folder / CONFIG_FILE
        assert secret_file.stat().st_mode & 0o777 == 0o600
        client = redis.Redis(port=server.port, username="app", password=password)
        assert client.ping()
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, username="app", password="wrong").ping()
    finally:
        server.stop()


def test_the_triton_admin_key_is_in_the_environment_not_the_command_line(exported: Exported, tmp_path: Path) -> None:
    if argv_secret_shim() is None:
        pytest.skip("no C compiler (cc) to build stack/argv_secret.c: the launcher warns and puts the key in argv")
    key = "triton-admin-3f9c2e71d0"
    repo = render_profile_repository(
        "cpu", tmp_path / "cpu", exported.repo, models=ranker_models(32, exported.batching)
    )
    with TritonServer(repo, log_path=tmp_path / "log.txt", admin_key=key) as server:
        assert server.process is not None
        line = cmdline(server.process.pid)
        assert key not in line and f"admin-key={ADMIN_KEY_PLACEHOLDER}" in line
        client = httpclient.InferenceServerClient(server.http_url)
        with pytest.raises(InferenceServerException, match=r"(?i)restricted|unauthori|forbidden|permission"):
            client.get_model_repository_index(headers={"admin-key": ADMIN_KEY_PLACEHOLDER})
        index = client.get_model_repository_index(headers={"admin-key": key})  # the key main() got
        assert {m["name"] for m in index} == {"ranker_onnx", "ranker_torchscript"}
