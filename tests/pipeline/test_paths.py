"""Outputs are valid wherever they are read from and wherever they are moved.

The README's command lines run literally, as a user types them, in a temporary working directory with
relative paths (real `spear` processes on the session's Ray, whose workers run in another directory);
then the outputs are read from another directory by absolute, ``~``, ``file://`` and symlinked paths,
moved whole, uploaded as is to SeaweedFS, and `status --clean` is shown to keep every committed file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pyarrow.parquet as pq
import pytest

from spear.cluster.storage import Storage, StorageError
from spear.pipeline.decode_job import read_segments
from spear.pipeline.ledger import TokenStore, list_token_versions
from spear.pipeline.status import clean_uncommitted, output_status

from support.configs import SMALL, storage_sets
from support.corpus import write_mixed_corpus

pytestmark = pytest.mark.slow

TINY_TRAIN = ["train.batch_seconds=8", "train.warmup_steps=1", "train.checkpoint_every=2", "train.student.size=tiny"]


def spear(cwd, *args, env=None, timeout=400):
    """`spear ARGS` run in ``cwd``, as a user would."""
    return subprocess.run([sys.executable, "-m", "spear.pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=timeout)


def sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def readme_run(ray_cluster, tmp_path_factory):
    """decode, tokenize, train and export as in the README, from ``work/`` with relative paths."""
    base = tmp_path_factory.mktemp("paths")
    work = base / "work"
    work.mkdir()
    write_mixed_corpus(Storage(), str(work / "data"), n_speech=4, n_audio=0, seconds=(1.5, 3.0))
    env = {"RAY_ADDRESS": ray_cluster.address, "HOME": str(base)}
    runs = {
        "decode": spear(work, "decode", "--input", "data/speech", "--domain", "speech", "--output", "out/decoded",
                        env=env),
        "tokenize": spear(work, "tokenize", "--input", "data/speech", "--domain", "speech", "--output", "out/tokens",
                          *sets(SMALL), env=env),
    }
    runs["train"] = spear(work, "train", "--shards", "out/tokens", "--output", "out/student", "--max-steps", "2",
                          *sets(TINY_TRAIN), env=env)
    runs["export"] = spear(work, "export", "out/student", "--output", "student-export/", env=env)
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    return {"base": base, "work": work, "out": work / "out", "env": env, "runs": runs}


def _records_are_relative(out):
    decode = json.loads((out / "decoded" / "decode.json").read_text())
    assert decode["record_version"] == 2 and decode["files"]
    assert all(f.startswith("segments/") for f in decode["files"])
    (version,) = list_token_versions(str(out / "tokens"), Storage())
    manifests = sorted((out / "tokens" / "tokens" / version / "manifests").glob("*.json"))
    m = json.loads(manifests[-1].read_text())
    assert m["manifest_version"] == 2 and m["shards"]
    assert all(s["file"].startswith("shards/") for s in m["shards"])
    assert all(f.startswith("ledger/") for f in m["ledger_files"])
    info = json.loads((out / "tokens" / "tokens" / version / "version.json").read_text())
    assert all(t["uri"].startswith("codebooks/") for t in info["teachers"].values())
    return version


def test_records_name_files_relative_to_the_output_and_status_counts_them_as_committed(readme_run):
    work, out, env = readme_run["work"], readme_run["out"], readme_run["env"]
    _records_are_relative(out)
    r = spear(work, "status", "out/tokens", env=env)
    assert r.returncode == 0, r.stderr
    assert "uncommitted" not in r.stdout and "token version" in r.stdout

    shards_before = sorted(p for p in (out / "tokens").rglob("*.parquet"))
    r = spear(work, "status", "out/tokens", "--clean", env=env)
    assert r.returncode == 0, r.stderr
    assert "removed 0 uncommitted files" in r.stderr
    assert sorted(p for p in (out / "tokens").rglob("*.parquet")) == shards_before

    r = spear(work, "status", "out/decoded", env=env)
    assert r.returncode == 0, r.stderr
    decode = json.loads((out / "decoded" / "decode.json").read_text())
    assert f"{decode['summary']['segments']} segments" in r.stdout and "decode output" in r.stdout
    assert "4 objects" in r.stdout and "0 quarantined" in r.stdout

    r = spear(work, "status", "out/student", env=env)
    assert r.returncode == 0 and "latest checkpoint step 2" in r.stdout, r.stderr


def test_training_shows_its_progress_on_stderr_and_not_ray_trains_own_info_lines(readme_run):
    """The training loop's progress line (loss, accuracies, throughput) reaches the user's stderr, never the
    summary on stdout; Ray Train's INFO lines (the worker group's start, each checkpoint's upload and report) stay
    out of it."""
    train = readme_run["runs"]["train"]
    assert re.search(r"\[train\] step 2/2: loss \d+\.\d+, speech/acc_masked \d\.\d+, \d+ audio s/s", train.stderr), \
        train.stderr[-3000:]
    assert "[train] step" not in train.stdout
    assert "Checkpoint successfully created" not in train.stderr and "Started training worker group" not in train.stderr
    # nor the workers' "Reporting training result N: TrainingReport(...)" line, one per checkpoint (it was there)
    assert "Reporting training result" not in train.stderr, train.stderr[-3000:]


@pytest.mark.parametrize("path", ["missing/place", "data"])
def test_status_on_a_missing_path_or_non_output_is_one_line_and_exit_1(readme_run, path):
    r = spear(readme_run["work"], "status", path, env=readme_run["env"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0], r.stderr
    assert ("does not exist" if path.startswith("missing") else "not a spear output") in lines[0]


def test_outputs_read_from_another_directory_by_every_spelling(readme_run, tmp_path, monkeypatch):
    base, out = readme_run["base"], readme_run["out"]
    monkeypatch.setenv("HOME", str(base))
    os.symlink(out, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    st = Storage()
    rel_home = "~/" + os.path.relpath(out, base)
    spellings = [str(out), rel_home, "file://" + str(out), "link", os.path.relpath(out, tmp_path)]
    want_segments = read_segments(str(out / "decoded"), st)
    assert want_segments.num_rows > 0
    (version,) = list_token_versions(str(out / "tokens"), st)
    want_tokens = TokenStore(str(out / "tokens"), version, st).read_table(["segment_id", "speech_tokens"])
    assert want_tokens.num_rows > 0  # (tokenize cut 2 s segments, decode its default)
    for root in spellings:
        assert read_segments(f"{root}/decoded", st).equals(want_segments), root
        store = TokenStore(f"{root}/tokens", version, st)
        assert store.read_table(["segment_id", "speech_tokens"]).equals(want_tokens), root
        assert store.uncommitted_files() == [], root
        status = output_status(f"{root}/tokens", st)
        assert status.versions[0].segments == want_tokens.num_rows and not status.versions[0].uncommitted
        assert output_status(f"{root}/decoded", st).decode["segments"] == want_segments.num_rows
    # export from here, by a `~` path to the training output
    r = spear(tmp_path, "export", f"{rel_home}/student", "--output", "again-export", "--json", env=readme_run["env"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["step"] == 2


def test_moved_output_reads_and_training_resumes_from_it(readme_run, tmp_path, monkeypatch):
    from spear.pipeline.train_job import checkpoints

    copy = tmp_path / "copy"
    shutil.copytree(readme_run["out"], copy, symlinks=True)
    moved = tmp_path / "elsewhere" / "out"
    moved.parent.mkdir()
    shutil.move(str(copy), str(moved))
    monkeypatch.chdir(tmp_path / "elsewhere")
    st = Storage()
    assert read_segments("out/decoded", st).num_rows == read_segments(str(readme_run["out"] / "decoded"), st).num_rows
    (version,) = list_token_versions("out/tokens", st)
    store = TokenStore("out/tokens", version, st)
    assert all(f.startswith(str(moved)) for f in store.shard_files())
    assert store.read_table(["segment_id"]).num_rows > 0
    assert clean_uncommitted("out/tokens", st) == ([], [])
    # the moved training output resumes on the moved tokens (checkpoints name shards relative to the dataset)
    r = spear(tmp_path / "elsewhere", "train", "--shards", "out/tokens", "--output", "out/student", "--max-steps", "4",
              "--json", *sets(TINY_TRAIN), env=readme_run["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["resumed_from_step"] == 2 and summary["step"] == 4
    assert [s for s, _ in checkpoints(str(moved / "student"), st)][-1] == 4


@pytest.mark.s3
def test_token_dataset_uploaded_as_is_to_s3_reads_the_same_and_trains(readme_run, s3_storage, tmp_path):
    local = readme_run["out"] / "tokens"
    (version,) = list_token_versions(str(local), Storage())
    fs, _ = s3_storage.filesystem("s3://spear/x")
    prefix = f"spear/uploaded-{uuid.uuid4().hex[:8]}"
    fs.put(str(local) + "/", prefix + "/tokens-copy/", recursive=True)  # the folder as is (aws s3 cp --recursive)
    uri = f"s3://{prefix}/tokens-copy"
    want = TokenStore(str(local), version, Storage()).read_table(["segment_id", "speech_tokens"])
    store = TokenStore(uri + "/", version, s3_storage)
    assert all(f.startswith(uri + "/tokens/") for f in store.shard_files())
    assert store.read_table(["segment_id", "speech_tokens"]).equals(want)
    status = output_status(uri, s3_storage)
    assert status.versions[0].segments == want.num_rows and not status.versions[0].uncommitted
    r = spear(tmp_path, "train", "--shards", uri, "--output", "student", "--max-steps", "2", "--json",
              *sets(TINY_TRAIN + storage_sets(s3_storage)), env=readme_run["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["step"] == 2 and json.loads(r.stdout)["token_version"] == version


# ----------------------------------------------------------------------------- outputs of older spear


def _legacy_copy(src, dst, *, spell):
    """A copy of token dataset ``src`` whose manifests are version 1, names spelled by ``spell(rel_path)``."""
    shutil.copytree(src, dst)
    for path in dst.rglob("manifests/*.json"):
        m = json.loads(path.read_text())
        root = path.parent.parent
        m.pop("manifest_version")  # version 1 had no such key
        for s in m["shards"]:
            s["file"] = spell(root, s["file"])
        m["ledger_files"] = [spell(root, f) for f in m["ledger_files"]]
        path.write_text(json.dumps(m))


def test_legacy_manifests_with_absolute_or_cwd_relative_paths_still_read(readme_run, tmp_path, monkeypatch):
    src = readme_run["out"] / "tokens"
    st = Storage()
    (version,) = list_token_versions(str(src), st)
    want = TokenStore(str(src), version, st).read_table(["segment_id"])
    # absolute paths (today's absolute --output), read where written, then after the folder moved
    old = tmp_path / "old"
    _legacy_copy(src, old, spell=lambda root, f: str(root / f))
    assert TokenStore(str(old), version, st).read_table(["segment_id"]).equals(want)
    shutil.move(str(old), str(tmp_path / "new"))
    moved = TokenStore(str(tmp_path / "new"), version, st)
    assert moved.read_table(["segment_id"]).equals(want)
    assert moved.uncommitted_files() == [] and clean_uncommitted(str(tmp_path / "new"), st) == ([], [])
    # the next commit (nothing new: a run that only re-commits) rewrites every name in the version 2 form
    m = moved.commit("run-next", [], [])
    record = json.loads((tmp_path / "new" / "tokens" / version / "manifests" / f"{m.seq:08d}.json").read_text())
    assert record["manifest_version"] == 2
    assert all(s["file"].startswith("shards/") for s in record["shards"]) and record["shards"]
    assert all(f.startswith("ledger/") for f in record["ledger_files"])
    assert TokenStore(str(tmp_path / "new"), version, st).read_table(["segment_id"]).equals(want)
    # paths relative to the directory the writer ran in (today's relative --output), read from elsewhere
    _legacy_copy(src, tmp_path / "rel", spell=lambda root, f: os.path.relpath(root / f, tmp_path))
    monkeypatch.chdir(readme_run["base"])
    rel = TokenStore(str(tmp_path / "rel"), version, st)
    assert rel.read_table(["segment_id"]).equals(want)
    assert rel.uncommitted_files() == []
    # a file that is truly gone: one line saying what to do
    victim = rel.shard_files()[0]
    os.remove(victim)
    with pytest.raises(StorageError) as err:
        TokenStore(str(tmp_path / "rel"), version, st).read_table(["segment_id"])
    assert "\n" not in str(err.value) and "older spear" in str(err.value) and "copy the whole" in str(err.value)


def test_legacy_decode_record_reads_after_a_move(readme_run, tmp_path):
    src = readme_run["out"] / "decoded"
    old = tmp_path / "old-decoded"
    shutil.copytree(src, old)
    record = json.loads((old / "decode.json").read_text())
    record.pop("record_version")
    record["files"] = [str(old / f) for f in record["files"]]
    (old / "decode.json").write_text(json.dumps(record))
    want = read_segments(str(src))
    assert read_segments(str(old)).equals(want)
    shutil.move(str(old), str(tmp_path / "new-decoded"))
    assert read_segments(str(tmp_path / "new-decoded")).equals(want)


def test_clean_never_deletes_a_committed_file_however_the_manifest_spells_it(readme_run, tmp_path):
    """Manifests spelling their files through a symlink, relative to another directory, or absolute: `--clean`
    removes the one real leftover and nothing else."""
    src = readme_run["out"] / "tokens"
    st = Storage()
    (version,) = list_token_versions(str(src), st)
    real = tmp_path / "real"
    os.symlink(tmp_path / "real", tmp_path / "via-link")
    _legacy_copy(src, real, spell=lambda root, f: str(tmp_path / "via-link" / os.path.relpath(root / f, real)))
    leftover_dir = real / "tokens" / version / "shards" / "run-killed"
    leftover_dir.mkdir(parents=True)
    shard = next((real / "tokens" / version / "shards").rglob("shard-*.parquet"))
    shutil.copy(shard, leftover_dir / "shard-leftover.parquet")
    committed = sorted(str(p) for p in real.rglob("*.parquet") if "run-killed" not in str(p))
    for root in (str(real), str(tmp_path / "via-link"), "file://" + str(real)):
        status = output_status(root, st)
        assert [os.path.basename(u) for u in status.versions[0].uncommitted] == ["shard-leftover.parquet"], root
    # a leftover written just now may be a running job's: kept unless --min-age allows it
    assert clean_uncommitted(str(tmp_path / "via-link"), st, min_age_s=3600)[0] == []
    assert (leftover_dir / "shard-leftover.parquet").exists()
    removed, recent = clean_uncommitted(str(tmp_path / "via-link"), st)
    assert [os.path.basename(u) for u in removed] == ["shard-leftover.parquet"] and recent == []
    assert sorted(str(p) for p in real.rglob("*.parquet")) == committed
    assert pq.read_table(shard).num_rows > 0
