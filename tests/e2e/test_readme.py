"""The README's examples run exactly as written (only `localhost:50051` / `localhost:8080` become the
test's addresses): the grpcurl session against the server, curl and buf curl through the gateway."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start : end if end != -1 else None]


def shell_blocks(text: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if "make " not in b]  # `make run`/`make gateway` start what the test has


async def run_script(script: str, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{ROOT / 'node_modules' / '.bin'}:{os.environ['PATH']}",
    }
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        raise
    return proc.returncode, out.decode(errors="replace")


async def test_the_grpcurl_examples_run_as_written(app, tmp_path):
    blocks = shell_blocks(section("Calling it with grpcurl"))
    assert len(blocks) >= 5  # auth, chat (send, then watch/list/cancel), search, images, preferences
    script = "\n".join(blocks).replace("localhost:50051", f"127.0.0.1:{app.port}")
    code, out = await run_script(script, tmp_path)
    assert code == 0, out[-4000:]
    assert "everything.chat.v1.ChatService" in out
    assert '"message_completed"' in out and "MESSAGE_STATUS_COMPLETED" in out
    assert '"sources_found"' in out or '"completed"' in out
    assert (tmp_path / "image.json").read_text().count('"image_url"') >= 1
    assert '"temperature": 0.2' in out


async def test_the_gateway_examples_run_as_written(gateway, tmp_path):
    blocks = shell_blocks(section("Through the gateway"))
    assert blocks
    script = "\n".join(blocks).replace("localhost:8080", f"127.0.0.1:{gateway.port}")
    code, out = await run_script(script, ROOT)  # from the repo, where `npx buf` finds buf (writes no files)
    assert code == 0, out[-4000:]
    assert '"email": "grace@example.com"' in out or '"email":"grace@example.com"' in out
    assert "everything.auth.v1.AuthService" in out  # buf curl listed services through reflection
    assert '"messageCompleted"' in out  # buf curl streamed a reply over gRPC-Web
