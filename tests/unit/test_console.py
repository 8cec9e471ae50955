import io
import logging

from hipt_ray.console import ConsoleHandler, Progress


def test_a_pipe_gets_a_line_at_most_every_period_and_the_last():
    out = io.StringIO()
    p = Progress("embed", total=100, unit="regions", stream=out, every=3600, live=False)
    for i in range(1, 101):
        p.update(i, slides=f"{i // 10}/10")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first update, then the close
    assert lines[0].startswith("embed: 1/100 regions")
    assert lines[-1].startswith("embed: 100/100 regions") and "slides 10/10" in lines[-1]
    assert "ETA" not in lines[-1] and "regions/s" in lines[-1]


def test_a_terminal_line_is_redrawn_in_place_and_ends_once():
    out = io.StringIO()
    with Progress("tile", total=4, unit="slides", stream=out, live=True) as p:
        for i in range(1, 5):
            p.update(i, failed=None if i < 3 else 1)
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and text.count("\n") == 1
    assert "failed 1" in text.rsplit("\r", 1)[1] and "failed" not in text.split("\r")[1]


def test_a_log_message_lifts_the_live_line_and_redraws_it():
    out = io.StringIO()
    log = logging.getLogger("hipt_ray.test_console")
    handler = ConsoleHandler(out)
    log.addHandler(handler)
    log.propagate = False
    try:
        p = Progress("embed", total=10, unit="regions", stream=out, live=True)
        p.update(3)
        log.warning("failed: s1.svs: cut short")
        p.close()
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    before, after = text.split("failed: s1.svs: cut short\n")
    drawn = before.split("\r")[1]
    assert drawn.startswith("embed: 3/10 regions") and before.endswith("\r" + " " * len(drawn) + "\r")
    assert after.startswith("\rembed: 3/10 regions")  # drawn again under the message


def test_a_progress_survives_pickling_as_tune_does_with_its_callbacks():
    import pickle
    import sys

    p = pickle.loads(pickle.dumps(Progress("sweep", total=2, unit="trials", stream=io.StringIO())))
    assert p.stream is sys.stderr and p.total == 2
