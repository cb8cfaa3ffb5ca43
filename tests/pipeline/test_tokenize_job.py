"""The tokenisation job end to end on a real Ray cluster, over local disk and SeaweedFS."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
import pytest
import torch

from spear.cluster.storage import join_uri
from spear.pipeline.ledger import TokenStore
from spear.pipeline.tokenize_job import run_tokenize

from support.corpus import write_mixed_corpus
from support.configs import tokenize_cfg

def live_tokens(st, out, version, roles=("speech", "audio")):
    cols = ["segment_id", "source_uri", "domain"] + [f"{r}_tokens" for r in roles]
    t = TokenStore(out, version, st).read_table(cols)
    return {row["segment_id"]: row for row in t.to_pylist()}


@pytest.mark.slow
def test_tokenize_mixed_corpus_end_to_end(ray_cluster, storage_root):
    from spear.stages.artefacts import load_quantizer
    from spear.stages.teacher_loading import load_teacher

    st, root = storage_root
    files = write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=6, n_audio=4)
    cfg = tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out"))
    s = run_tokenize(cfg, progress=False)

    assert s.new_objects == 10 and s.skipped_objects == 0 and not s.quarantined
    assert s.committed_objects == 10 and s.committed_segments == s.segments > 10
    assert set(s.codebooks) == {"speech", "audio"} and all(cb.fitted_now for cb in s.codebooks.values())
    assert all(0 < cb.heldout_loss < 1 for cb in s.codebooks.values())

    store = TokenStore(cfg.output, s.token_version, st)
    rows = list(store.iter_segments())
    assert len(rows) == s.segments
    speech_t = load_teacher(cfg.teachers.speech)
    audio_t = load_teacher(cfg.teachers.audio)
    qs = {r: load_quantizer(cb.uri, storage=st) for r, cb in s.codebooks.items()}
    for row in rows:
        n = len(row["audio"])
        assert row["speech_tokens"].shape == (speech_t.num_frames_for(n), 4)
        assert row["speech_tokens"].dtype == np.uint8
        if row["domain"] == "speech":
            assert row["audio_tokens"] is None  # the asymmetric loss: no audio-teacher targets on speech
        else:
            assert row["audio_tokens"].shape == (audio_t.num_frames_for(n), 2)
    # stored tokens equal q.encode(teacher(audio)) computed directly, for a sample of segments
    for row in rows[::3]:
        wav = torch.from_numpy(row["audio"])[None]
        for role, teacher in (("speech", speech_t), ("audio", audio_t)):
            if row[f"{role}_tokens"] is None:
                continue
            emb = teacher(wav, torch.tensor([wav.shape[1]])).unbatch()[0]
            assert np.array_equal(qs[role].encode(emb).numpy(), row[f"{role}_tokens"]), (role, row["segment_id"])
    assert sum(1 for r in rows if r["domain"] == "audio") >= 4
    assert {r["source_uri"] for r in rows} == set(files["speech"]) | set(files["audio"])


@pytest.mark.slow
def test_incremental_runs_process_only_new_and_changed_objects(ray_cluster, tmp_path):
    from spear.cluster.storage import Storage

    st, root = Storage(), str(tmp_path)
    # 3 audio files: with 2 (about 4 s) the audio codebook fit sat at its 64-frame minimum, and which
    # segments the held-out hash took (ogg bytes, hence segment ids, differ per write) decided the run
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=4, n_audio=3, seed=1)
    cfg = tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out"))
    first = run_tokenize(cfg, progress=False)
    before = live_tokens(st, cfg.output, first.token_version)

    # nothing new: nothing tokenised
    again = run_tokenize(cfg, progress=False)
    assert again.new_objects == 0 and again.segments == 0 and again.skipped_objects == 7
    assert again.token_version == first.token_version and again.commits == 0

    # two new files: only those reach the teachers
    added = write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=1, n_audio=1, seed=2)
    third = run_tokenize(cfg, progress=False)
    assert third.new_objects == 2 and third.skipped_objects == 7
    after = live_tokens(st, cfg.output, first.token_version)
    new_ids = set(after) - set(before)
    assert third.segments == len(new_ids) > 0  # teacher calls == segments of the new files only
    assert {after[i]["source_uri"] for i in new_ids} == set(added["speech"]) | set(added["audio"])
    assert all(after[i] == before[i] for i in before)

    # a changed file is re-tokenised and its old rows superseded
    changed = added["speech"][0]
    from support.corpus import speechlike
    from support.audio_files import encode

    st.write_bytes(changed, encode(speechlike(np.random.default_rng(9), 3.3, 16000)[:, None], 16000, "flac"))
    fourth = run_tokenize(cfg, progress=False)
    assert fourth.new_objects == 1 and fourth.skipped_objects == 8
    final = live_tokens(st, cfg.output, first.token_version)
    old_rows = {i for i in after if after[i]["source_uri"] == changed}
    new_rows = {i for i in final if final[i]["source_uri"] == changed}
    assert old_rows and new_rows and not (old_rows & new_rows)
    assert len(new_rows) == fourth.segments
    assert set(final) == (set(after) - old_rows) | new_rows  # no duplicates, nothing else touched


@pytest.mark.slow
def test_new_codebook_shape_makes_a_new_token_version_beside_the_old(ray_cluster, tmp_path):
    from spear.cluster.storage import Storage
    from spear.pipeline.status import output_status

    st, root = Storage(), str(tmp_path)
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=3, n_audio=2, seed=3)
    a = run_tokenize(tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out")), progress=False)
    b = run_tokenize(tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out"),
                                  ["mvq.speech_codebooks=8"]), progress=False)
    assert a.token_version != b.token_version
    assert b.new_objects == 5  # the new version starts from scratch
    status = output_status(join_uri(root, "out"), st)
    assert {v.token_version for v in status.versions} == {a.token_version, b.token_version}
    for v in status.versions:
        assert sum(s["objects"] for s in v.sources.values()) == 5 and not v.uncommitted


@pytest.mark.slow
def test_shards_are_plain_parquet_for_pyarrow_duckdb_polars(ray_cluster, tmp_path):
    import duckdb
    import polars as pl
    from spear.cluster.storage import Storage

    st, root = Storage(), str(tmp_path)
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=2, n_audio=2, seed=4)
    s = run_tokenize(tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out")), progress=False)
    files = TokenStore(join_uri(root, "out"), s.token_version, st).shard_files()
    assert files
    meta = pq.read_metadata(files[0])
    schema = meta.schema.to_arrow_schema()
    assert schema.field("speech_tokens").type == pa.binary()
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            if col.path_in_schema.endswith("_tokens") or col.path_in_schema == "audio":
                assert "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings
                assert col.compression == "UNCOMPRESSED"
    total = sum(pq.read_metadata(f).num_rows for f in files)
    n_duck = duckdb.sql(f"select count(*) from read_parquet({files!r}) where octet_length(speech_tokens) > 0").fetchall()[0][0]
    n_polars = pl.read_parquet(files).filter(pl.col("speech_tokens").bin.size() > 0).height
    assert n_duck == n_polars == total
    # token bytes on disk vs raw uint8 size: no overhead beyond the Parquet framing
    raw = sum(int(pa.compute.sum(pa.compute.binary_length(pq.read_table(f, columns=["speech_tokens"])["speech_tokens"])).as_py())
              for f in files)
    assert s.token_bytes["speech"] <= 1.1 * raw + 200 * len(files)


@pytest.mark.slow
def test_speech_only_corpus_gets_speech_tokens_only(ray_cluster, tmp_path):
    from spear.cluster.storage import Storage

    st, root = Storage(), str(tmp_path)
    write_mixed_corpus(st, join_uri(root, "corpus"), n_speech=3, n_audio=0, seed=6)
    cfg = tokenize_cfg(st, join_uri(root, "corpus"), join_uri(root, "out"))
    cfg.corpus.sources = cfg.corpus.sources[:1]
    s = run_tokenize(cfg, progress=False)
    assert set(s.codebooks) == {"speech"} and s.new_objects == 3
    rows = TokenStore(cfg.output, s.token_version, st).read_table(["speech_tokens", "domain"])
    assert rows.num_rows == s.segments and set(rows["domain"].to_pylist()) == {"speech"}


def test_teacher_pools_and_decode_tasks_share_the_cluster():
    """Two CPU teacher pools + the writer leave room for a decode task on 1 CPU and half the CPUs on 16;
    two GPU teachers on one GPU take half of it each instead of falling back to CPU."""
    from spear.config import TeacherConfig
    from spear.pipeline.tokenize_job import WRITER_CPUS, decode_task_cpus, teacher_pool_kwargs

    teachers = [TeacherConfig(kind="mfcc"), TeacherConfig(kind="fbank")]

    def held(pools):
        return WRITER_CPUS + sum(kw["num_cpus"] * kw["compute"].max_size for kw in pools)

    one = [teacher_pool_kwargs(t, {"CPU": 1.0}, 2, None) for t in teachers]
    assert all("num_gpus" not in kw for kw in one)
    assert 0 < decode_task_cpus(1.0, 1.0, one, WRITER_CPUS) <= 1.0 - held(one) + 1e-9  # schedulable: no stall
    sixteen = [teacher_pool_kwargs(t, {"CPU": 16.0}, 2, None) for t in teachers]
    assert held(sixteen) <= 8 + WRITER_CPUS  # half the CPUs stay with decoding
    assert decode_task_cpus(1.0, 16.0, sixteen, WRITER_CPUS) == 1.0
    gpu = [teacher_pool_kwargs(TeacherConfig(kind="mfcc", num_gpus=1.0), {"CPU": 16.0, "GPU": 1.0}, 2, None)
           for _ in range(2)]
    assert [kw["num_gpus"] for kw in gpu] == [0.5, 0.5] and all(kw["compute"].max_size == 1 for kw in gpu)
    assert [kw["num_cpus"] for kw in gpu] == [1.0, 1.0]  # a GPU actor's feeding CPU, where CPUs abound
    # ... but on a 2-CPU node with one GPU, whole CPUs for both GPU actors left decoding none: pass 2 waited forever
    small_gpu = [teacher_pool_kwargs(TeacherConfig(kind="mfcc", num_gpus=1.0), {"CPU": 2.0, "GPU": 1.0}, 2, None)
                 for _ in range(2)]
    assert [kw["num_gpus"] for kw in small_gpu] == [0.5, 0.5]
    assert 0.1 <= decode_task_cpus(1.0, 2.0, small_gpu, WRITER_CPUS) <= 2.0 - held(small_gpu) + 1e-9
    # torch threads per CPU actor: its pool's CPUs over its actors (pass 2's two pools on 2 CPUs: 1 each;
    # pass 1's single pool: 2); a GPU actor keeps torch's own setting
    threads = [[kw.get("fn_constructor_kwargs", {}).get("num_threads") for kw in pools] for pools in (
        [teacher_pool_kwargs(t, {"CPU": 2.0}, 2, None) for t in teachers], [teacher_pool_kwargs(teachers[0], {"CPU": 2.0}, 1, None)],
        sixteen, gpu)]
    assert threads == [[1, 1], [2], [2, 2], [None, None]]


def test_teacher_pools_reserve_memory_from_the_teachers_footprint_within_their_share():
    """Each pool's actors reserve the memory their teacher's footprint needs (weights from the fingerprint's
    file sizes or the wheel's weight file, output from its description), never more than the pool's share
    of the cluster's memory; a teacher's ``memory_gb`` is taken as set."""
    from spear.config import TeacherConfig
    from spear.models.teachers.crepe import crepe_weights_path
    from spear.pipeline.tokenize_job import teacher_footprint, teacher_pool_kwargs
    from spear.stages.teacher import GiB, teacher_actor_memory

    crepe = TeacherConfig(kind="crepe")
    fp = teacher_footprint(crepe, {"kind": "crepe"}, {"frame_rate": 25.0, "dim": 256}, 30.0, 16000)
    assert fp.weight_bytes == crepe_weights_path().stat().st_size > 0  # the wheel's tiny.pth
    wavlm = TeacherConfig(kind="wavlm", path="s3://b/wavlm", num_gpus=1.0)
    files = {"files": [["config.json", 2_000, "e1"], ["model.safetensors", 1_261_869_120, "e2"]]}
    big = teacher_footprint(wavlm, files, {"frame_rate": 50.0, "dim": 1024}, 20.0, 16000)
    assert (big.weight_bytes, big.max_segment_seconds) == (1_261_871_120, 20.0)
    assert teacher_footprint(TeacherConfig(kind="mfcc"), {}, {"frame_rate": 50, "dim": 78}, 30, 16000).weight_bytes == 0

    roomy = {"CPU": 16.0, "GPU": 2.0, "memory": 256 * GiB}
    kw = teacher_pool_kwargs(wavlm, roomy, 2, None, big)
    assert kw["memory"] == teacher_actor_memory("wavlm", big, rows=kw["batch_size"], batch_seconds=120.0, on_gpu=True)
    assert 3 * GiB < kw["memory"] < 5 * GiB  # weights twice, the batch's audio and 1024-dim embeddings
    # on CPU the activations of a sub-batch count too; without a footprint or memory figure nothing is reserved
    cpu = teacher_pool_kwargs(crepe, {"CPU": 4.0, "memory": 16 * GiB}, 2, None, fp)
    assert cpu["memory"] > teacher_actor_memory("crepe", fp, rows=cpu["batch_size"], batch_seconds=120.0, on_gpu=True)
    assert "memory" not in teacher_pool_kwargs(crepe, {"CPU": 4.0, "memory": 16 * GiB}, 2, None)
    assert "memory" not in teacher_pool_kwargs(crepe, {"CPU": 4.0}, 2, None, fp)
    # a small cluster: each of the pool's actors gets at most its share (two pools, two actors each on 8 CPUs)
    small = teacher_pool_kwargs(wavlm, {"CPU": 8.0, "memory": 4 * GiB}, 2, None, big)
    assert small["memory"] * small["compute"].max_size <= 2 * GiB
    assert teacher_pool_kwargs(TeacherConfig(kind="crepe", memory_gb=0.75), {"CPU": 4.0}, 2, None, fp)["memory"] \
        == int(0.75 * GiB)


def test_pass_one_reads_a_small_slice_then_what_the_reservoirs_still_need():
    from spear.pipeline.codebooks import next_slice_objects

    # 64 objects gave 3200 frames (50 each): the 38800 still wanted need 776 more, +25 %
    assert next_slice_objects(seen=3200, read=64, want_seen=42000, first=64) == 970
    assert next_slice_objects(seen=41000, read=900, want_seen=42000, first=64) == 64  # never below the first slice
    assert next_slice_objects(seen=0, read=64, want_seen=42000, first=64) == 128  # no frames yet: twice the objects
