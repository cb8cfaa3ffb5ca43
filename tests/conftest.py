"""Session-wide real services for the tests: one embedded Ray cluster, one SeaweedFS S3 server.

Fixtures:
- ``ray_cluster``: an embedded Ray (2 CPUs, private temp dir), started once per session.
- ``s3_server``: a SeaweedFS ``weed mini`` with bucket ``spear`` and SigV4 auth.
- ``s3_storage``: a :class:`Storage` with that server's endpoint and credentials.
- ``storage_root``: parametrised over local disk and S3: ``(storage, root_uri)``, a fresh root per test.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from spear.cluster.storage import Storage

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Tests must never reach out to a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _torch_threads_unchanged(request):
    """A test that changes this process's torch threads must restore them: the jobs that later tests run in this
    process (the tokenize job's codebook fit, evaluation's features) compute other floats on another thread count,
    so a leaked ``torch.set_num_threads(1)`` gave CI's 200-step demo check another student than a run of it alone."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        after = torch.get_num_threads()
        torch.set_num_threads(before)
        pytest.fail(f"{request.node.nodeid} left torch on {after} thread(s) (it had {before}): restore them")


@pytest.fixture(scope="session")
def ray_cluster():
    from spear.cluster.ray_runtime import ray_session
    from spear.config import RayConfig

    with ray_session(RayConfig(num_cpus=2, object_store_memory_mb=1024)) as info:
        yield info


@pytest.fixture(scope="session")
def s3_server():
    from spear.cluster.local_s3 import LocalS3Server

    server = LocalS3Server(bucket="spear").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_storage(s3_server) -> Storage:
    return Storage(s3_server.storage_options())


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """(Storage, root URI): the same test on local disk and on the SeaweedFS server."""
    if request.param == "local":
        yield Storage(), str(tmp_path / "root")
    else:
        server = request.getfixturevalue("s3_server")
        yield Storage(server.storage_options()), f"s3://{server.bucket}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def demo_tokens(ray_cluster, tmp_path_factory):
    """The tiny demo corpus tokenised with the weight-free teachers (mfcc speech, fbank audio).

    Returns (DemoCorpus, token output URI, TokenizeSummary).
    """
    from spear.config import SourceConfig, load_config
    from spear.synthetic.corpus import generate_demo_corpus
    from spear.pipeline.tokenize_job import run_tokenize

    root = tmp_path_factory.mktemp("demo-tokens")
    corpus = generate_demo_corpus(str(root / "corpus"), size="tiny", seed=0)
    cfg = load_config(None, [f"output={root / 'tokens'}", "mvq.speech_codebooks=8", "mvq.audio_codebooks=4",
                             "mvq.codebook_size=64", "mvq.sample_frames=4000", "decode.max_segment_seconds=10"])
    cfg.corpus.sources = [SourceConfig(uri=str(corpus.speech_dir), domain="speech", name="demo-speech"),
                          SourceConfig(uri=str(corpus.audio_dir), domain="audio", name="demo-audio")]
    summary = run_tokenize(cfg, progress=False)
    return corpus, cfg.output, summary
