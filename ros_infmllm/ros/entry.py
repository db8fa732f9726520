"""The one way our executables run a node: init, build (exit 2 on bad configuration), spin,
shut down in ``finally``; and the one way a tool or test spins nodes in the background."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node


def run_node(build: Callable[[], Node], name: str, config_errors: tuple[type[BaseException], ...],
             args: list[str] | None = None) -> int:
    """Spin the node ``build()`` returns until shutdown; 2 when building it raises a config error."""
    rclpy.init(args=args)
    try:
        node = build()
    except config_errors as exc:
        rclpy.logging.get_logger(name).fatal(f"cannot start: {exc}")
        rclpy.try_shutdown()
        return 2
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


@contextlib.contextmanager
def spinning(*nodes: Node, executor: Executor | None = None) -> Iterator[Executor]:
    """Spin ``nodes`` on a background thread for the ``with`` block. On leaving it the executor
    is shut down and its thread joined, before the caller destroys the nodes or the context:
    rclpy aborts the whole process if its context goes away under a spinning thread."""
    executor = executor or SingleThreadedExecutor()
    for node in nodes:
        executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        yield executor
    finally:
        executor.shutdown()
        thread.join(timeout=5)
