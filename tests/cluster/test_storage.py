import pytest

from spear.cluster.storage import Storage, StorageError, StorageOptions, cached_storage, join_uri, split_uri


def test_uri_forms(tmp_path):
    assert split_uri("s3://b/k/x.wav") == ("s3", "b/k/x.wav")
    assert split_uri(f"file://{tmp_path}/a") == ("file", f"{tmp_path}/a")
    assert join_uri("s3://b/p", "x", "y.parquet") == "s3://b/p/x/y.parquet"
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        split_uri("gs://b/x")


def test_cached_storage_is_one_client_per_set_of_options(tmp_path):
    a = cached_storage(StorageOptions(region="eu-west-1"))
    assert cached_storage(StorageOptions(region="eu-west-1")) is a          # equal options, the same client
    assert cached_storage(StorageOptions(region="us-east-1")) is not a
    assert cached_storage(None) is cached_storage(StorageOptions()) and cached_storage().options == StorageOptions()
    a.write_bytes(str(tmp_path / "x.bin"), b"abc")                          # a real Storage
    assert cached_storage().read_bytes(str(tmp_path / "x.bin")) == b"abc"


def test_read_write_list_delete(storage_root):
    st, root = storage_root
    st.write_bytes(join_uri(root, "a", "one.wav"), b"1")
    st.write_bytes(join_uri(root, "a", "b", "two.flac"), b"22")
    st.write_bytes(join_uri(root, "a", "notes.txt"), b"x")
    entries = st.list_files(join_uri(root, "a"), extensions=["wav", "flac"])
    assert sorted(e.uri.rsplit("/", 1)[-1] for e in entries) == ["one.wav", "two.flac"]
    assert [e.uri for e in entries] == sorted(e.uri for e in entries)
    assert {e.size for e in entries} == {1, 2} and all(e.etag for e in entries)
    assert st.read_bytes(join_uri(root, "a", "b", "two.flac")) == b"22"
    st.delete(join_uri(root, "a"), recursive=True)
    assert not st.exists(join_uri(root, "a", "one.wav"))
    # the folder itself is gone too (SeaweedFS kept an emptied folder, which listings showed)
    assert not st.exists(join_uri(root, "a")) and not st.isdir(join_uri(root, "a"))
    st.delete(join_uri(root, "a"), recursive=True)  # deleting what is not there is no error
    with pytest.raises(FileNotFoundError):
        st.read_bytes(join_uri(root, "a", "one.wav"))
    with pytest.raises(StorageError, match="does not exist"):
        st.list_files(join_uri(root, "nothing-here"))


def test_etag_changes_when_content_changes(storage_root):
    st, root = storage_root
    uri = join_uri(root, "x.wav")
    st.write_bytes(uri, b"first")
    before = st.list_files(uri)[0].etag
    st.write_bytes(uri, b"second version")
    assert st.list_files(uri)[0].etag != before


@pytest.mark.s3
def test_bad_credentials_fail_fast_with_clear_message(s3_server):
    bad = Storage(StorageOptions(endpoint_url=s3_server.endpoint_url, key="wrong", secret="wrong", retries=1))
    with pytest.raises(StorageError, match="access denied.*credentials") as ei:
        bad.check_access(f"s3://{s3_server.bucket}/x")
    assert "wrong" not in str(ei.value)


def test_unreachable_endpoint_fails_fast():
    from support.configs import closed_port

    with closed_port() as port:
        st = Storage(StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", key="k", secret="s", retries=1,
                                    connect_timeout_s=1))
        with pytest.raises(StorageError, match="cannot reach storage"):
            st.check_access("s3://bucket/prefix")


@pytest.mark.s3
def test_missing_bucket(s3_storage):
    with pytest.raises(StorageError, match="does not exist"):
        s3_storage.check_access("s3://no-such-bucket/x")


@pytest.mark.parametrize("endpoint, why", [("closed", "connection refused"),
                                           ("http://no-such-host.invalid:8333", "does not resolve")])
def test_an_endpoint_that_never_answered_is_reported_at_once_with_default_retries(endpoint, why):
    """Connection refused or an unknown name on first contact: no retries (the defaults are 5 attempts,
    connect_timeout_s 5), one StorageError naming the endpoint and the reason."""
    import time

    from support.configs import closed_port

    with closed_port() as port:
        url = f"http://127.0.0.1:{port}" if endpoint == "closed" else endpoint
        st = Storage(StorageOptions(endpoint_url=url, key="k", secret="s"))
        assert st.options.retries == 5 and st.options.connect_timeout_s == 5.0
        start = time.monotonic()
        for call in (lambda: st.check_access("s3://bucket/prefix"), lambda: st.read_bytes("s3://bucket/a"),
                     lambda: st.list_files("s3://bucket/prefix")):
            with pytest.raises(StorageError, match=f"cannot reach storage for s3://bucket/.* at {url}: .*{why}"):
                call()
        assert time.monotonic() - start < 30  # a guard against minutes of retries, not a benchmark


@pytest.mark.s3
def test_a_storage_that_answered_before_rides_out_an_outage():
    """Retries with backoff are for a storage that has answered: a read while it restarts succeeds."""
    import dataclasses
    import threading

    from spear.cluster.local_s3 import LocalS3Server

    server = LocalS3Server(bucket="spear").start()
    try:
        st = Storage(dataclasses.replace(server.storage_options(), retries=6))
        st.write_bytes("s3://spear/outage/x", b"kept")
        server.stop()
        failed: list[BaseException] = []

        def come_back() -> None:
            try:
                server.start()  # the same ports and data
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failed.append(exc)

        back = threading.Timer(1.0, come_back)
        back.start()
        try:
            data = st.read_bytes("s3://spear/outage/x")
        except StorageError as exc:
            pytest.fail(f"{exc} (the restart: {failed or 'done'})")
        finally:
            back.join()
        assert data == b"kept"
    finally:
        server.close()
