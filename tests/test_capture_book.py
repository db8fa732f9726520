"""Which steps the CUDA-graph runner captures, and what a failed capture gives up (CaptureBook:
pure bookkeeping, so on the CPU; tests/test_cuda_graphs.py checks the runner itself on a GPU)."""
from __future__ import annotations

from ros_infmllm.backends.graph_runner import CaptureBook


def test_a_key_is_captured_after_its_warm_up_calls_and_never_when_told_not_to() -> None:
    book = CaptureBook(warmups=2, max_graphs=16)
    assert [book.should_capture("decode", 0) for _ in range(3)] == [False, False, True]
    assert not any(book.should_capture("rare", 0, capture=False) for _ in range(5))


def test_a_failed_key_is_retried_once_then_runs_eagerly_while_other_keys_are_captured() -> None:
    book = CaptureBook(warmups=0, retries=1, max_failures=4)
    assert book.should_capture(("frame", 218), 1)
    book.failed(("frame", 218), RuntimeError("capture invalidated"))
    assert "retried at its next call" in book.error and "('frame', 218)" in book.error
    assert book.should_capture(("frame", 218), 1)  # the retry
    book.failed(("frame", 218), RuntimeError("capture invalidated"))
    assert "it runs eagerly" in book.error and "every step" not in book.error
    assert not book.should_capture(("frame", 218), 1)
    assert book.should_capture(("next", 1), 1)  # decode is still captured


def test_after_max_failures_nothing_more_is_captured() -> None:
    book = CaptureBook(warmups=0, retries=0, max_failures=2)
    for key in ("a", "b"):
        assert book.should_capture(key, 0)
        book.failed(key, RuntimeError("no"))
    assert "every step not yet captured" in book.error
    assert not book.should_capture("c", 0)


def test_no_more_graphs_than_the_limit() -> None:
    book = CaptureBook(warmups=0, max_graphs=2)
    assert book.should_capture("a", 1) and not book.should_capture("b", 2)


def test_may_capture_is_true_while_warming_up_and_false_once_a_key_is_given_up() -> None:
    """The runner copies a call's inputs as a capture would only while the key may still be
    captured (its warm-up calls); a key given up, or past the graph limit, runs on its inputs."""
    book = CaptureBook(warmups=2, retries=0, max_graphs=3)
    assert not book.should_capture("frame", 0) and book.may_capture("frame", 0)  # a warm-up call
    assert not book.may_capture("frame", 3)  # no room for another graph
    book.failed("frame", RuntimeError("no"))
    assert not book.may_capture("frame", 0) and book.may_capture("next", 0)
    assert not any(book.should_capture("frame", 0) for _ in range(4))


def test_a_failed_key_runs_eagerly_for_its_warm_up_calls_before_the_retry_and_keeps_its_first_reason() -> None:
    """What a capture tripped on (a recompilation, say) then happens in an eager call, not in the retry."""
    book = CaptureBook(warmups=2, retries=1)
    assert [book.should_capture("frame", 0) for _ in range(3)] == [False, False, True]
    book.failed("frame", RuntimeError("Detected recompile"), "pool recording ended here")
    assert "retried after 2 eager calls" in book.error
    assert [book.should_capture("frame", 0) for _ in range(3)] == [False, False, True]
    book.failed("frame", RuntimeError("already recording to mempool_id"))
    assert book.first_errors == {"frame": "RuntimeError: Detected recompile [pool recording ended here]"}
    assert book.calls["frame"] == 6 and not book.should_capture("frame", 0)


def test_captures_run_under_fail_on_recompile_where_torch_has_it(monkeypatch) -> None:
    """A recompilation inside a capture fails at once with its guard (torch >= 2.6); a torch without
    stances (some JetPack wheels) still captures."""
    import contextlib

    import torch

    from ros_infmllm.backends import graph_runner

    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance: stances.append(stance) or contextlib.nullcontext(),
                        raising=False)
    with graph_runner._no_recompiles():
        pass
    assert stances == ["fail_on_recompile"]
    monkeypatch.delattr(torch.compiler, "set_stance")
    assert isinstance(graph_runner._no_recompiles(), contextlib.nullcontext)
