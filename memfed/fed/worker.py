"""A warm ClientApp executor: one long-lived process runs every ClientApp task of a SuperNode.

With its default ``--isolation subprocess`` a Flower 1.42 SuperNode starts a fresh ``flwr-clientapp``
process for every message: each round re-imports torch, transformers and PEFT and reloads the model
(about 4 s of CPU per message on a small machine), which is most of a round's cost for a LoRA update
that trains in a fraction of a second. Flower's ``--isolation process`` mode leaves launching tasks to
an external executor; this is one that runs the task in its own process, so the model, the node's
identity and its training items stay loaded from round to round (``client_app.load_setup`` caches
them), and the next round starts in milliseconds.

It speaks the SuperNode's Runtime API exactly as Flower's ``flower-superexec`` and ``flwr-clientapp``
do (acquire a task and its token, pull the message and context, push the reply and the task's status,
heartbeats while it runs), with Flower's own client code. It only ever runs memfed's ClientApp: a task
whose app (FAB) names another ClientApp gets an error reply, never code execution. Started by
``memfed fed join`` (``deploy.launch_supernode(warm=True)``) in the SuperNode's process group.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import threading
import time
import tomllib
import zipfile
from typing import Any

log = logging.getLogger("memfed.fed.worker")
CLIENT_APP_REF = "memfed.fed.client_app:app"


def fab_client_app(fab_content: bytes) -> str:
    """The ClientApp a FAB (a zip holding the app's pyproject.toml) names, or "" if it names none."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as z:
            doc = tomllib.loads(z.read("pyproject.toml").decode("utf-8"))
    except (KeyError, zipfile.BadZipFile, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return ""
    components = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return str(components.get("clientapp", ""))


def _client(address: str, component: str, token: str | None = None) -> Any:
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on the node's loopback only
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str) -> None:
    """Run one ClientApp task in this process (what ``flwr-clientapp --token`` does, minus the exit)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from memfed.fed.client_app import app

    client = _client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _run, fab = pull_task_input(client)
        named = fab_client_app(fab.content)
        if named != CLIENT_APP_REF:
            raise PermissionError(f"this node runs only {CLIENT_APP_REF}; the run's app names {named!r}")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:
        log.exception("ClientApp task failed")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(
    address: str, *, poll_s: float = 0.2, stop: threading.Event | None = None, parent_pid: int | None = None
) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at ``address`` until ``stop`` is set or the
    SuperNode process ``parent_pid`` is gone."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    stop = stop or threading.Event()
    client = _client(address, "SuperExec")
    try:
        while not stop.is_set() and _alive(parent_pid):
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                run_task(address, res.token)
            else:
                time.sleep(poll_s)
    finally:
        client.close()


def warm_up() -> None:
    """Import what a training round needs (torch, transformers, PEFT: seconds of CPU) before the first
    task comes, while the SuperNode waits for the server, so the first round does not pay for it.

    At low priority (this thread only): while the federation starts, the SuperLink, ``flwr run`` and
    the ServerApp need the CPU more; the imports fill the waits between them.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
    try:
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        import memfed.cube.fingerprint
        import memfed.fed.client_app
        import memfed.fed.local
        import memfed.node.models  # noqa: F401
    except Exception:
        log.exception("warm-up import failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="memfed's warm ClientApp executor for a SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="The SuperNode's Runtime API.")
    parser.add_argument("--supernode-pid", type=int, default=None, help="Exit when this process is gone.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    serve(args.runtime_api_address, parent_pid=args.supernode_pid)


if __name__ == "__main__":
    main()
