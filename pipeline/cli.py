"""The `spear` command line.

Every job command takes an optional CONFIG (YAML), ``--set section.key=value`` overrides,
``--address`` (a Ray cluster; default: embedded local Ray) and ``--json``, which prints the
final summary as one JSON object on stdout and nothing else there (logs go to stderr).

    spear config init > spear.yaml
    spear decode --input data/speech --domain speech --output out/decoded
    spear demo
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator, Optional

import click

from spear.pipeline.config import ConfigError, SpearConfig, commented_default_config, dump_config, load_config


class SpearCLIError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:  # one clear line (or block), no traceback
        click.echo(f"error: {self.message}", err=True)


@contextlib.contextmanager
def _stdout_reserved(enabled: bool) -> Iterator[Any]:
    """While a --json job runs, file descriptor 1 points at stderr (Ray workers, libraries, prints).

    Yields the real stdout as a text stream for the final JSON object.
    """
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    old_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout.flush()
        sys.stdout = old_stdout
        os.dup2(saved, 1)
        os.close(saved)
        real.flush()
        real.close()


def _run_job(as_json: bool, job: Callable[[], Any], human: Callable[[Any], str]) -> None:
    """Run a job, map known failures to one-line errors, print JSON or a human summary."""
    from spear.cluster.ray_runtime import RayConnectionError
    from spear.cluster.storage import StorageError

    with _stdout_reserved(as_json) as out:
        try:
            result = job()
        except ConfigError as exc:
            raise SpearCLIError(str(exc)) from None
        except (StorageError, RayConnectionError, FileNotFoundError) as exc:
            err = SpearCLIError(str(exc))
            err.exit_code = 1
            raise err from None
        if as_json:
            out.write(json.dumps(result.to_dict(), default=str) + "\n")
    if not as_json:
        click.echo(human(result))


def _load(config: Optional[str], sets: tuple[str, ...], extra: list[str]) -> SpearConfig:
    try:
        return load_config(config, list(sets) + extra)
    except ConfigError as exc:
        raise SpearCLIError(str(exc)) from None


def _sources_override(inputs: Optional[str], domain: Optional[str]) -> list[str]:
    if not inputs:
        if domain:
            raise SpearCLIError("--domain needs --input")
        return []
    if not domain:
        raise SpearCLIError("--input needs --domain speech|audio")
    uris = [u.strip() for u in inputs.split(",") if u.strip()]
    return ["corpus.sources=" + json.dumps([{"uri": u, "domain": domain} for u in uris])]


def config_options(f: Callable) -> Callable:
    f = click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object on stdout.")(f)
    f = click.option("--address", default=None, help="Ray cluster address (default: embedded local Ray; RAY_ADDRESS works too).")(f)
    f = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config field (repeatable).")(f)
    f = click.argument("config", required=False, type=click.Path(dir_okay=False))(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="spear-pipeline")
def main() -> None:
    """SPEAR pre-training on Ray: decode corpora, tokenise with frozen teachers + MVQ, train students, evaluate."""


# --------------------------------------------------------------------------- config


@main.group()
def config() -> None:
    """Create and inspect configuration files."""


@config.command("init")
def config_init() -> None:
    """Print a commented default config (redirect it to a file to start one)."""
    click.echo(commented_default_config(), nl=False)


@config.command("show")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config field (repeatable).")
def config_show(config: Optional[str], sets: tuple[str, ...]) -> None:
    """Validate CONFIG and print the resolved config (secrets masked)."""
    click.echo(dump_config(_load(config, sets, [])), nl=False)


# --------------------------------------------------------------------------- jobs


@main.command()
@config_options
@click.option("--input", "inputs", default=None, metavar="URI[,URI...]", help="Audio sources (local paths, file:// or s3://).")
@click.option("--domain", type=click.Choice(["speech", "audio"]), default=None, help="Domain of the --input sources.")
@click.option("--output", default=None, help="Where segments go (overrides `output`).")
@click.option("--overwrite", is_flag=True, help="Replace an existing decode result at --output.")
def decode(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
           inputs: Optional[str], domain: Optional[str], output: Optional[str], overwrite: bool) -> None:
    """Decode audio into 16 kHz FLAC segments (Parquet) plus a quarantine table of skipped objects."""
    extra = _sources_override(inputs, domain)
    if output:
        extra.append(f"output={json.dumps(output)}")
    if address:
        extra.append(f"ray.address={json.dumps(address)}")
    cfg = _load(config, sets, extra)
    from spear.pipeline.decode_job import run_decode

    def human(s) -> str:
        lines = [f"decoded {s.decoded_objects}/{s.objects} objects into {s.segments} segments, "
                 f"{s.audio_seconds / 3600:.3f} h of audio in {s.wall_seconds:.1f} s "
                 f"({s.realtime_factor:.0f}x real time)", f"output: {s.output}"]
        if s.quarantined:
            lines.append(f"quarantined {len(s.quarantined)}:")
            lines += [f"  {q['uri']}: {q['reason']}" for q in s.quarantined]
        return "\n".join(lines)

    _run_job(as_json, lambda: run_decode(cfg, overwrite=overwrite, progress=True), human)


@main.command()
@config_options
@click.option("--workdir", default="spear-demo", show_default=True, help="Where the demo corpus and results go.")
@click.option("--size", type=click.Choice(["tiny", "demo"]), default="demo", show_default=True,
              help="Corpus size: tiny (tests, seconds) or demo (tens of minutes of audio).")
def demo(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
         workdir: str, size: str) -> None:
    """Run the embedded demo end to end: generate a labelled corpus, decode it, and report."""
    extra = [f"ray.address={json.dumps(address)}"] if address else []
    cfg = _load(config, sets, extra)
    from spear.pipeline.demo import run_demo

    _run_job(as_json, lambda: run_demo(cfg, workdir=workdir, size=size), lambda s: s.human())


@main.command()
@config_options
@click.option("--input", "inputs", default=None, metavar="URI[,URI...]", help="Audio sources (local paths, file:// or s3://).")
@click.option("--domain", type=click.Choice(["speech", "audio"]), default=None, help="Domain of the --input sources.")
@click.option("--output", default=None, help="Token dataset location (overrides `output`).")
def tokenize(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
             inputs: Optional[str], domain: Optional[str], output: Optional[str]) -> None:
    """Tokenise a corpus: teachers + MVQ into Parquet token shards (incremental, crash-safe).

    Only objects that are new or changed since the last committed run are processed; codebooks are
    fitted (pass 1) the first time a teacher version is seen. Without a config the weight-free
    teachers are used (mfcc for speech, fbank for audio).
    """
    extra = _sources_override(inputs, domain)
    if output:
        extra.append(f"output={json.dumps(output)}")
    if address:
        extra.append(f"ray.address={json.dumps(address)}")
    cfg = _load(config, sets, extra)
    from spear.pipeline.tokenize_job import run_tokenize

    _run_job(as_json, lambda: run_tokenize(cfg), lambda s: s.human())


def _workers(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    parts = value.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None:
        raise SpearCLIError(f"--workers {value!r}: expected N or MIN:MAX")
    return f"train.workers=[{lo}, {hi}]"


@main.command()
@config_options
@click.option("--shards", default=None, help="Token dataset (the --output of `spear tokenize`).")
@click.option("--output", default=None, help="Where checkpoints and metrics go (overrides `output`).")
@click.option("--workers", default=None, metavar="MIN:MAX", help="Ray Train workers; MIN:MAX makes the run elastic.")
@click.option("--max-steps", type=int, default=None, help="Train until this step (overrides train.max_steps).")
def train(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool, shards: Optional[str],
          output: Optional[str], workers: Optional[str], max_steps: Optional[int]) -> None:
    """Train the student on token shards with Ray Train (checkpointed, resumable, elastic).

    A re-run with the same --output resumes from its latest checkpoint.
    """
    extra = []
    if shards:
        extra.append(f"train.shards={json.dumps(shards)}")
    if output:
        extra.append(f"output={json.dumps(output)}")
    if address:
        extra.append(f"ray.address={json.dumps(address)}")
    if workers:
        extra.append(_workers(workers))
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    cfg = _load(config, sets, extra)
    from spear.pipeline.train_job import run_train

    _run_job(as_json, lambda: run_train(cfg), lambda s: s.human())


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object on stdout.")
@click.option("--clean", is_flag=True, help="Remove uncommitted shard files left by interrupted runs.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Config overrides (storage.*).")
def status(output: str, as_json: bool, clean: bool, sets: tuple[str, ...]) -> None:
    """Show token versions, committed sources, hours per domain, quarantine and leftovers of OUTPUT."""
    cfg = _load(None, sets, [])
    from spear.cluster.storage import Storage, StorageOptions
    from spear.pipeline.status import clean_uncommitted, output_status

    storage = Storage(StorageOptions.from_config(cfg.storage))

    def job():
        if clean:
            removed = clean_uncommitted(output, storage)
            print(f"removed {len(removed)} uncommitted files", file=sys.stderr)
        return output_status(output, storage)

    _run_job(as_json, job, lambda s: s.human())


def _not_in_this_build(name: str, issue: str) -> Callable:
    def cmd(**_: Any) -> None:
        raise SpearCLIError(f"`spear {name}` is not in this build yet: it arrives with {issue}.")
    return cmd


_LATER = {
    "evaluate": ("Probe frozen features of students and teachers; write a report with plots.", "the evaluation job"),
    "export": ("Export a student checkpoint as a standalone model (safetensors + config).", "the training job"),
    "submit": ("Submit a spear command as a Ray Job to a cluster.", "cluster job submission"),
}
for _name, (_help, _issue) in _LATER.items():
    main.command(name=_name, help=_help, context_settings={"ignore_unknown_options": True})(
        click.argument("args", nargs=-1, type=click.UNPROCESSED)(_not_in_this_build(_name, _issue)))


if __name__ == "__main__":
    main()
