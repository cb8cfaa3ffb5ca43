"""Console lines: stderr only (stdout holds --json summaries), a logger passed through, pickled for Ray tasks."""

from __future__ import annotations

import pickle

from spear.cluster.console import console_log


def test_lines_go_to_stderr_with_their_prefix_or_nowhere(capsys):
    console_log(True)("one")
    console_log(True, prefix="[tokenize] ")("two")
    console_log(False)("three")
    pickle.loads(pickle.dumps(console_log(prefix="[evaluate] ")))("four")  # as a Ray task receives it
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == ["one", "[tokenize] two", "[evaluate] four"]
    seen: list[str] = []
    assert console_log(seen.append) == seen.append  # a caller's own logger is used as it is
