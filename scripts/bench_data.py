"""Time and memory of the data path against corpus size: preparation, loading, batching, training.

    python scripts/bench_data.py --multi30k data/multi30k --sizes multi30k,0.1M,1M,5M \\
        --vocabs word,bpe --nproc 2 --out docs/data_scale.json --plot docs/data_scale.png
    python scripts/bench_data.py --multi30k data/multi30k --quick    # 20k pairs: checks the script
    python scripts/bench_data.py --report docs/data_scale.json --plot docs/data_scale.png  # redraw

For each size a corpus is written by scripts/make_corpus.py into --work: `20k`, `0.1M`, `5M` are
synthetic (Multi30k lines, one or two pairs per line: they measure time and memory, not quality);
`multi30k` is Multi30k's own training set, the baseline that larger corpora are compared with.
For each vocabulary (both share one vocabulary, as experiment=cpu's shared embeddings need)

    word   data.vocab=word data.shared_vocab=true
    bpe    joint BPE as experiment=cpu: data.vocab=bpe data.vocab_size=8000 data.shared_vocab=true

the benchmark measures, each command in a subprocess of its own run with this checkout's src/:

    prepare      `mt-prepare data=custom ... data.workers=W` for each W of --workers, each on a
                 fresh data.root: wall time, pairs/s, the peak of the summed RSS (and PSS) of the whole
                 process tree (workers are child processes; sampled from /proc every 0.2 s) and the
                 main process's own VmHWM. Code without `data.workers` prepares W=1 without the
                 key and fails W>1 with Hydra's error, recorded as such.
    cache        its size on disk
    load         `load_prepared(cfg)` and `len(data.split("train"))`: seconds and peak RSS (VmHWM)
    batches      one epoch of `TokenBucketSampler` batches over the train split's lengths: seconds
    train        `mt-train experiment=cpu trainer.max_steps=100` on that cache: seconds, peak RSS,
                 and its anonymous and file-backed parts (RssAnon / RssFile; Pss_Anon / Pss_File of
                 smaps_rollup: pages of a mapped cache count in RSS but are shared and reclaimable)
    evaluate     `mt-evaluate split=test decode=beam` of that run's checkpoint against the cache
    torchrun     with --nproc 2: the same training under `torchrun --nproc_per_node=2`, per rank

and once per size the limits of the cores: spaCy's tokenizer alone over the training lines
(`Tokenizer(lang).pipe`, both sides) on one core, and SentencePiece encoding alone of those
tokens with the bpe cache's model; then (with more than one worker) the tokenizer in two
processes at once, one per core, whose summed pairs/s is the limit two workers are compared
with. Training validates on the first --val-lines lines of Multi30k's validation set (and
evaluation reads the first --test-lines of test_2016_flickr, default all), so that decoding
with a barely trained model does not dominate the runs; these files are part of every prepared
cache's key. --quick shortens everything to check that the script works.

--prepare-only stops each size after its preparations (and the limits). Results go to --out
(JSON: the figures, the commit, date, CPU and core count) and a Markdown table beside it (.md),
printed at the end; --plot draws time and memory against corpus size. Run it on an otherwise
idle machine: every figure is wall time or resident memory. A command that fails is recorded
with its error and the rest goes on. Corpora and caches in --work are removed size by size
unless --keep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PEAK_RSS = SCRIPTS / "peak_rss.py"  # runs a script, then reports its peak RSS (VmHWM, KiB)
SAMPLE_SECONDS = 0.2
MIB = 1024 * 1024
VOCABS = {
    "word": ["data.vocab=word", "data.shared_vocab=true"],
    "bpe": ["data.vocab=bpe", "data.vocab_size=8000", "data.shared_vocab=true"],
}
FULL = {
    "sizes": "0.1M,1M,5M",
    "vocabs": "word,bpe",
    "workers": "1,2",
    "train_steps": 100,
    "eval_decode": "beam",
    "val_lines": 100,
    "test_lines": None,  # all of test_2016_flickr
}
# A check that the script works: a small corpus and short runs, whose figures measure little.
QUICK = FULL | {
    "sizes": "20k",
    "train_steps": 5,
    "eval_decode": "greedy",
    "val_lines": 20,
    "test_lines": 50,
}

# ---------------------------------------------------------------------------------------------
# Snippets run in a fresh interpreter: what they print last is one line of JSON.

LOAD_SNIPPET = r"""
import json, sys, time

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024

settings = json.loads(sys.argv[1])
from transformer_mt.config import DataConfig, to_dataclass
from transformer_mt.data.dataset import load_prepared
imported_mib = peak_mib()
started = time.perf_counter()
data = load_prepared(to_dataclass(DataConfig, settings))
train = data.split("train")
pairs = len(train)
load_seconds = time.perf_counter() - started
load_mib = peak_mib()

from transformer_mt.data.batching import TokenBucketSampler

def lengths(split, side):
    found = getattr(split, f"{side}_lengths", None)
    if found is None:
        return [len(ids) for ids in getattr(split, side)]
    return found() if callable(found) else found

started = time.perf_counter()
src_lengths, tgt_lengths = lengths(train, "src"), lengths(train, "tgt")
lengths_seconds = time.perf_counter() - started
sampler = TokenBucketSampler(src_lengths, tgt_lengths, settings["max_tokens"], seed=1234)
sampler_seconds = time.perf_counter() - started - lengths_seconds
batches = sampler.batches(1)
batch_seconds = time.perf_counter() - started
print(json.dumps({
    "pairs": pairs, "imported_peak_mib": imported_mib, "load_seconds": load_seconds,
    "load_peak_mib": load_mib, "lengths_seconds": lengths_seconds,
    "sampler_init_seconds": sampler_seconds, "batches_seconds": batch_seconds,
    "num_batches": len(batches), "batches_peak_mib": peak_mib(),
}))
"""

LIMITS_SNIPPET = r"""
import itertools, json, os, sys, time
settings = json.loads(sys.argv[1])
os.sched_setaffinity(0, {settings["core"]})  # one core
from transformer_mt.data.tokenize import Tokenizer
sp = None
if settings["cache"]:  # the prepared cache's SentencePiece model (joint: both sides)
    import sentencepiece as spm
    from transformer_mt.config import DataConfig, to_dataclass
    from transformer_mt.data.dataset import load_prepared
    model = load_prepared(to_dataclass(DataConfig, settings["cache"])).src_subword.to_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model)
if settings.get("start_at"):  # set up first, then start with the other process
    for lang in settings["langs"]:
        Tokenizer(lang, settings["lowercase"])
    time.sleep(max(settings["start_at"] - time.time(), 0))
tokenize_seconds = encode_seconds = 0.0
lines = tokens = pieces = 0
for path, lang in zip(settings["files"], settings["langs"]):
    tokenizer = Tokenizer(lang, settings["lowercase"])
    with open(path, encoding="utf-8") as handle:
        counted = 0
        while settings["max_lines"] is None or counted < settings["max_lines"]:
            left = settings["max_lines"]
            want = 10_000 if left is None else min(10_000, left - counted)
            chunk = [line.rstrip("\n") for line in itertools.islice(handle, want)]
            if not chunk:
                break
            counted += len(chunk)
            started = time.perf_counter()
            chunk_tokens = list(tokenizer.pipe(chunk))
            tokenize_seconds += time.perf_counter() - started
            tokens += sum(map(len, chunk_tokens))
            if sp is not None:
                texts = [" ".join(t) for t in chunk_tokens]
                started = time.perf_counter()
                ids = sp.encode(texts, out_type=int, num_threads=1)
                encode_seconds += time.perf_counter() - started
                pieces += sum(map(len, ids))
        lines += counted
pairs = lines / 2
print(json.dumps({
    "pairs": pairs, "tokens": tokens, "pieces": pieces if sp else None,
    "tokenize_seconds": tokenize_seconds,
    "tokenize_pairs_per_s": pairs / tokenize_seconds if tokenize_seconds else None,
    "encode_seconds": encode_seconds if sp else None,
    "encode_pairs_per_s": pairs / encode_seconds if sp and encode_seconds else None,
}))
"""


# ---------------------------------------------------------------------------------------------
# Measuring a command: wall time, and the memory of its process tree sampled from /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    children, pids, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    values = {}
    with open(path) as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in names:
                values[key] = int(rest.split()[0])
    return values


STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
SMAPS_FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


class TreeSampler(threading.Thread):
    """Every SAMPLE_SECONDS, the memory of process `root` and all its descendants.

    Keeps the peak of the tree's summed RSS and PSS (RSS counts shared pages once per process,
    PSS divides them among the processes that share them), and each process's peaks of the
    /proc/<pid>/status and smaps_rollup fields, with its command line and torchrun RANK.
    """

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stopped = threading.Event()
        self.tree_peak_rss_kib = 0
        self.tree_peak_pss_kib = 0
        self.processes: dict[int, dict[str, Any]] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(SAMPLE_SECONDS)

    def sample(self) -> None:
        rss_total = pss_total = 0
        for pid in _tree(self.root):
            try:
                fields = _kib_fields(f"/proc/{pid}/status", STATUS_FIELDS)
                fields |= _kib_fields(f"/proc/{pid}/smaps_rollup", SMAPS_FIELDS)
                record = self.processes.get(pid) or self._describe(pid)
            except (OSError, ValueError):
                continue  # the process ended between the listing and the read
            self.processes[pid] = record
            for key, value in fields.items():
                record[key] = max(record.get(key, 0), value)
            rss_total += fields.get("VmRSS", 0)
            pss_total += fields.get("Pss", 0)
        self.tree_peak_rss_kib = max(self.tree_peak_rss_kib, rss_total)
        self.tree_peak_pss_kib = max(self.tree_peak_pss_kib, pss_total)

    @staticmethod
    def _describe(pid: int) -> dict[str, Any]:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as handle:
            env = dict(
                item.decode(errors="replace").partition("=")[::2]
                for item in handle.read().split(b"\0")
                if item
            )
        command = " ".join(Path(a).name if a.startswith("/") else a for a in argv[:3])
        return {"pid": pid, "command": command[:80], "rank": env.get("RANK")}


def measure(command: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `command` to its end; its wall time, exit status and memory (MiB), as a dict."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = ("<snippet>" if "\n" in arg else arg for arg in command)
    print(f"  $ {' '.join(shown)}", flush=True)
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            proc.wait()
        finally:  # interrupted: end the measured command too
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        seconds = time.perf_counter() - started
        sampler.stopped.set()
        sampler.join()
    text = log.read_text(errors="replace")
    result: dict[str, Any] = {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "tree_peak_rss_mib": round(sampler.tree_peak_rss_kib / 1024, 1),
        "tree_peak_pss_mib": round(sampler.tree_peak_pss_kib / 1024, 1),
        "processes": [
            {
                k: (round(v / 1024, 1) if k in STATUS_FIELDS + SMAPS_FIELDS else v)
                for k, v in p.items()
            }
            for p in sampler.processes.values()
            if p.get("VmHWM", 0) > 20 * 1024  # leave out shells and tiny helpers
        ],
        "log": str(log),
    }
    if not result["ok"]:
        lines = [line for line in text.splitlines() if line.strip()]
        result["error"] = "\n".join(lines[-8:])
        result["reason"] = failure_reason(lines)
        print(f"    failed ({proc.returncode}): {result['reason']}", flush=True)
    else:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        if last.startswith("{"):
            result["output"] = json.loads(last)
        print(
            f"    {seconds:.1f} s, tree peak RSS {result['tree_peak_rss_mib']:.0f} MiB", flush=True
        )
    return result


def failure_reason(lines: list[str]) -> str:
    """The line of a failed command's output that says why: Hydra's and Python's last words."""
    said = [
        line
        for line in lines
        if not line.startswith((" ", "\t", "Set the environment variable HYDRA_FULL_ERROR"))
    ]
    return said[-1] if said else "no output"


def with_peak_rss(script: str, report: Path, args: list[str]) -> list[str]:
    """`python peak_rss.py REPORT scripts/<script> ARGS`: the script's VmHWM lands in REPORT."""
    return [sys.executable, str(PEAK_RSS), str(report), str(SCRIPTS / script), *args]


def read_peak(report: Path) -> float | None:
    return round(int(report.read_text()) / 1024, 1) if report.is_file() else None


# ---------------------------------------------------------------------------------------------
# The benchmark


def parse_size(text: str) -> tuple[str, int | None]:
    """(label, pairs): `20k` -> ("20k", 20000); `multi30k` -> Multi30k's own training set."""
    if text == "multi30k":
        return text, None
    from make_corpus import parse_count

    return text, parse_count(text)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.work.resolve()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
            ),
        }
        self.has_workers = self._config_has("workers")
        self.has_subword_sample = self._config_has("subword_sample")

    def _config_has(self, key: str) -> bool:
        code = (
            "from transformer_mt.config import DataConfig as C; print(%r in C.__dataclass_fields__)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code % key],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() == "True"

    # Corpora ---------------------------------------------------------------------------------

    def corpus(self, label: str, pairs: int | None) -> tuple[Path, dict[str, Any]]:
        folder = self.work / "corpora" / label
        command = [sys.executable, str(SCRIPTS / "make_corpus.py"), "--out", str(folder)]
        command += ["--multi30k", str(self.args.multi30k.resolve()), "--langs", self.args.langs]
        command += ["--verbatim"] if pairs is None else ["--pairs", str(pairs), "--seed", "0"]
        made = measure(command, self.work / "logs" / f"corpus-{label}.log", self.env)
        if not made["ok"]:
            raise SystemExit(f"could not write the {label} corpus: {made.get('error')}")
        src, tgt = self.args.langs.split(",")
        for split, count in (("val", self.args.val_lines), ("test", self.args.test_lines)):
            for lang in (src, tgt) if count else ():
                with open(folder / f"{split}.{lang}", encoding="utf-8") as full:
                    head = list(itertools.islice(full, count))
                (folder / f"{split}{count or ''}.{lang}").write_text(
                    "".join(head), encoding="utf-8"
                )
        with open(folder / f"train.{src}", "rb") as train:
            lines = sum(1 for _ in train)
        size = sum((folder / f"train.{lang}").stat().st_size for lang in (src, tgt))
        info = {"pairs": lines, "text_mb": round(size / 1e6, 1), "seconds": made["seconds"]}
        return folder, info

    def data_overrides(self, folder: Path, vocab: str, root: Path) -> list[str]:
        src, tgt = self.args.langs.split(",")
        val, test = f"val{self.args.val_lines or ''}", f"test{self.args.test_lines or ''}"
        return [
            "data=custom",
            f"data.src={src}",
            f"data.tgt={tgt}",
            f"data.train=[{folder}/train.{src},{folder}/train.{tgt}]",
            f"data.valid=[{folder}/{val}.{src},{folder}/{val}.{tgt}]",
            f"data.test=[{folder}/{test}.{src},{folder}/{test}.{tgt}]",
            *VOCABS[vocab],
            f"data.root={root}",
            *(
                [f"data.subword_sample={self.args.subword_sample}"]
                if self.args.subword_sample
                else []
            ),
        ]

    def data_settings(self, folder: Path, vocab: str, root: Path) -> dict[str, Any]:
        """The settings of `data_overrides` as the mapping `to_dataclass(DataConfig, ...)` takes."""
        settings: dict[str, Any] = {"name": "custom", "max_tokens": 2048, "root": str(root)}
        for item in self.data_overrides(folder, vocab, root)[1:]:
            key, _, value = item.removeprefix("data.").partition("=")
            if value.startswith("["):
                settings[key] = value[1:-1].split(",")
            elif value in ("true", "false"):
                settings[key] = value == "true"
            else:
                settings[key] = int(value) if value.isdigit() else value
        return settings

    # One size and vocabulary -----------------------------------------------------------------

    def prepare(self, label: str, folder: Path, vocab: str, workers: int) -> dict[str, Any]:
        root = self.work / "roots" / f"{label}-{vocab}-w{workers}"
        shutil.rmtree(root, ignore_errors=True)
        overrides = self.data_overrides(folder, vocab, root)
        note = None
        if self.has_workers:
            overrides.append(f"data.workers={workers}")
        elif workers != 1:
            note = "this code has no data.workers: the key is passed and Hydra refuses it"
            overrides.append(f"data.workers={workers}")
        else:
            note = "this code has no data.workers: prepared in one process without the key"
        report = self.work / "logs" / f"prepare-{label}-{vocab}-w{workers}.peak"
        log = self.work / "logs" / f"prepare-{label}-{vocab}-w{workers}.log"
        result = measure(with_peak_rss("prepare_data.py", report, overrides), log, self.env)
        result["workers"] = workers
        result["root"] = str(root)
        result["main_peak_mib"] = read_peak(report)
        if note:
            result["note"] = note
        if result["ok"]:
            result["cache_mb"] = round(folder_bytes(root / "cache") / 1e6, 1)
        return result

    def load(self, label: str, settings: dict[str, Any], vocab: str) -> dict[str, Any]:
        command = [sys.executable, "-c", LOAD_SNIPPET, json.dumps(settings)]
        return measure(command, self.work / "logs" / f"load-{label}-{vocab}.log", self.env)

    def train(self, label: str, overrides: list[str], vocab: str, nproc: int) -> dict[str, Any]:
        run_name = f"bench-{label}-{vocab}-n{nproc}"
        shutil.rmtree(self.work / "saved" / run_name, ignore_errors=True)
        shutil.rmtree(self.work / "result" / run_name, ignore_errors=True)
        args = [
            "experiment=cpu",
            *overrides,
            f"trainer.max_steps={self.args.train_steps}",
            "trainer.max_time=null",
            "trainer.progress=false",
            "trainer.average_last=0",
            "trainer.num_samples=0",
            "trainer.device=cpu",
            f"run_name={run_name}",
            f"saved_dir={self.work / 'saved'}",
            f"result_dir={self.work / 'result'}",
        ]
        log = self.work / "logs" / f"train-{label}-{vocab}-n{nproc}.log"
        if nproc == 1:
            report = log.with_suffix(".peak")
            result = measure(with_peak_rss("train.py", report, args), log, self.env)
            result["main_peak_mib"] = read_peak(report)
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += [f"--nproc_per_node={nproc}", str(SCRIPTS / "train.py"), *args]
            env = {**self.env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
            result = measure(command, log, env)
            result["ranks"] = sorted(
                (p for p in result["processes"] if p.get("rank") is not None),
                key=lambda p: int(p["rank"]),
            )
        saved = self.work / "saved" / run_name
        checkpoint = next(
            (saved / n for n in ("best.pt", "last.pt") if (saved / n).is_file()), None
        )
        result["checkpoint"] = str(checkpoint) if checkpoint else None
        return result

    def evaluate(self, label: str, vocab: str, checkpoint: str) -> dict[str, Any]:
        args = [
            f"checkpoint={checkpoint}",
            "split=test",
            f"decode={self.args.eval_decode}",
            "device=cpu",
            f"result_dir={self.work / 'result'}",
        ]
        log = self.work / "logs" / f"evaluate-{label}-{vocab}.log"
        report = log.with_suffix(".peak")
        result = measure(with_peak_rss("evaluate.py", report, args), log, self.env)
        result["main_peak_mib"] = read_peak(report)
        return result

    def limits(self, label: str, folder: Path, cache: dict[str, Any] | None) -> dict[str, Any]:
        """One core's tokenizer, and SentencePiece with the model of `cache` (data settings)."""
        langs = self.args.langs.split(",")
        settings = {
            "files": [str(folder / f"train.{lang}") for lang in langs],
            "langs": langs,
            "lowercase": False,
            "cache": cache,
            "max_lines": self.args.limit_lines,
        }
        cores = sorted(os.sched_getaffinity(0))
        command = [sys.executable, "-c", LIMITS_SNIPPET, json.dumps(settings | {"core": cores[0]})]
        result = measure(command, self.work / "logs" / f"limits-{label}.log", self.env)
        if len(cores) > 1 and max(self.args.workers) > 1:
            result["together"] = self.limits_together(label, settings, cores[:2])
        return result

    def limits_together(
        self, label: str, settings: dict[str, Any], cores: list[int]
    ) -> dict[str, Any]:
        """The tokenizer alone in two processes at once, one per core, each over the same lines:
        the limit of two busy cores (two cores of a VM rarely run two processes at twice the
        speed of one). SentencePiece is left out."""
        print("  the tokenizer on two cores at once", flush=True)
        logs = [self.work / "logs" / f"limits-{label}-core{core}.log" for core in cores]
        procs = []
        start_at = time.time() + 30  # both set up by then (spaCy's languages take seconds)
        for core, log in zip(cores, logs, strict=True):
            one = json.dumps(settings | {"core": core, "cache": None, "start_at": start_at})
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", LIMITS_SNIPPET, one],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=self.env,
                        cwd=log.parent,
                    )
                )
        rates = []
        for proc, log in zip(procs, logs, strict=True):
            proc.wait()
            last = log.read_text(errors="replace").strip().splitlines()[-1:]
            if proc.returncode != 0 or not last or not last[0].startswith("{"):
                return {"ok": False, "reason": f"see {log}"}
            rates.append(json.loads(last[0])["tokenize_pairs_per_s"])
        print(f"    {sum(rates):,.0f} pairs/s in all ({', '.join(f'{r:,.0f}' for r in rates)})")
        return {"ok": True, "cores": cores, "pairs_per_s": rates, "total_pairs_per_s": sum(rates)}

    def one(self, label: str, folder: Path, pairs: int, vocab: str) -> dict[str, Any]:
        print(f"{label} pairs, vocab {vocab}", flush=True)
        row: dict[str, Any] = {"size": label, "pairs": pairs, "vocab": vocab, "prepare": {}}
        for workers in self.args.workers:
            row["prepare"][str(workers)] = self.prepare(label, folder, vocab, workers)
        ready = [p for p in row["prepare"].values() if p["ok"]]
        if not ready:
            print("  no preparation succeeded: nothing else to measure", flush=True)
            return row
        root = Path(ready[0]["root"])
        row["cache_root"] = str(root)
        row["cache_mb"] = ready[0]["cache_mb"]
        for other in ready[1:]:
            shutil.rmtree(other["root"], ignore_errors=True)
        if self.args.prepare_only:
            return row
        row["load"] = self.load(label, self.data_settings(folder, vocab, root), vocab)
        overrides = self.data_overrides(folder, vocab, root)
        row["train"] = self.train(label, overrides, vocab, 1)
        if row["train"]["checkpoint"]:
            row["evaluate"] = self.evaluate(label, vocab, row["train"]["checkpoint"])
        if self.args.nproc > 1:
            row["torchrun"] = self.train(label, overrides, vocab, self.args.nproc)
        return row

    def run(self) -> dict[str, Any]:
        results: dict[str, Any] = {"machine": machine(), "settings": settings(self.args)}
        results["settings"]["data_workers_key"] = self.has_workers
        results["corpora"], results["rows"] = {}, []
        for label, pairs in map(parse_size, self.args.sizes):
            folder, info = self.corpus(label, pairs)
            results["corpora"][label] = info
            subword_cache = None
            for vocab in self.args.vocabs:
                row = self.one(label, folder, info["pairs"], vocab)
                results["rows"].append(row)
                if vocab != "word" and row.get("cache_root") and subword_cache is None:
                    subword_cache = self.data_settings(folder, vocab, Path(row["cache_root"]))
                write_json(self.args.out, results)
            print(f"{label} pairs: limits of the cores", flush=True)
            info["limits"] = self.limits(label, folder, subword_cache)
            write_json(self.args.out, results)
            if not self.args.keep:
                for row in results["rows"]:
                    if row["size"] == label and row.get("cache_root"):
                        shutil.rmtree(row["cache_root"], ignore_errors=True)
                shutil.rmtree(folder, ignore_errors=True)
        return results


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open("/proc/cpuinfo") as cpuinfo:
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
        ]
    cpu = models[0] if models else platform.machine()
    mem_kib = _kib_fields("/proc/meminfo", ("MemTotal",)).get("MemTotal", 0)
    versions = {}
    for package in ("torch", "spacy", "sentencepiece", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "commit": commit + ("+local changes" if dirty else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / MIB, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": versions,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sizes": args.sizes,
        "vocabs": {v: VOCABS[v] for v in args.vocabs},
        "workers": args.workers,
        "train_steps": args.train_steps,
        "eval_decode": args.eval_decode,
        "val_lines": args.val_lines,
        "test_lines": args.test_lines,
        "nproc": args.nproc,
        "limit_lines": args.limit_lines,
        "prepare_only": args.prepare_only,
        "subword_sample": args.subword_sample,
    }


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Report: Markdown tables and a plot


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ok(result: dict[str, Any] | None) -> dict[str, Any] | None:
    return result if result and result.get("ok") else None


def markdown(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"Commit {m['commit']}, {m['date']}: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB "
        f"(load average at start {m['load_average_at_start'][0]:.2f}). Synthetic corpora from "
        f"Multi30k (scripts/make_corpus.py); times in seconds, memory in MiB.",
        "",
        "**Preparation** (`mt-prepare`, fresh data.root; peak RSS of the process tree, and of "
        "the main process alone)",
        "",
        "| pairs | vocab | workers | wall s | pairs/s | tree peak RSS | tree peak PSS | main VmHWM "
        "| cache MB | % of tokenizer limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        info = results["corpora"].get(row["size"], {}).get("limits") or {}
        limit_rate = (info.get("output") or {}).get("tokenize_pairs_per_s")
        together = (_ok(info.get("together")) or {}).get("total_pairs_per_s")
        for workers, p in row["prepare"].items():
            if not p["ok"]:
                reason = p.get("reason", "").replace("|", "/")[:90]
                lines.append(
                    f"| {row['pairs']:,} | {row['vocab']} | {workers} | failed: {reason} "
                    "| | | | | | |"
                )
                continue
            rate = row["pairs"] / p["seconds"]
            if int(workers) > 1 and together:
                share = 100 * rate / together  # the limit of the two cores, measured busy
            else:
                share = 100 * rate / (int(workers) * limit_rate) if limit_rate else None
            lines.append(
                f"| {row['pairs']:,} | {row['vocab']} | {workers} | {p['seconds']:.1f} | {rate:,.0f} "
                f"| {p['tree_peak_rss_mib']:,.0f} | {p['tree_peak_pss_mib']:,.0f} "
                f"| {_fmt(p.get('main_peak_mib'))} | {_fmt(p.get('cache_mb'), 1)} | {_fmt(share)} |"
            )
    notes = {p["note"] for row in results["rows"] for p in row["prepare"].values() if "note" in p}
    lines += ["", *(f"Note: {note}." for note in sorted(notes))] if notes else []
    lines += [
        "",
        f"**Using the cache** (load: `load_prepared` + `len(split('train'))`; batches: one epoch "
        f"of `TokenBucketSampler` at max_tokens 2048; train: {s['train_steps']} steps of "
        f"experiment=cpu; evaluate: split=test, decode={s['eval_decode']}; RSS = peak VmHWM of "
        "the process, anon / file = peak RssAnon / RssFile)",
        "",
        "| pairs | vocab | load s | load RSS | batches s | batches | train s | train RSS "
        "| train anon / file | evaluate s | evaluate RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        load = (_ok(row.get("load")) or {}).get("output") or {}
        train, evaluate = _ok(row.get("train")), _ok(row.get("evaluate"))
        main = _main_process(train)
        lines.append(
            f"| {row['pairs']:,} | {row['vocab']} | {_fmt(load.get('load_seconds'), 2)} "
            f"| {_fmt(load.get('load_peak_mib'))} | {_fmt(load.get('batches_seconds'), 2)} "
            f"| {_fmt(load.get('num_batches'))} | {_fmt(train and train['seconds'], 1)} "
            f"| {_fmt(train and train.get('main_peak_mib'))} "
            f"| {_fmt(main.get('RssAnon'))} / {_fmt(main.get('RssFile'))} "
            f"| {_fmt(evaluate and evaluate['seconds'], 1)} "
            f"| {_fmt(evaluate and evaluate.get('main_peak_mib'))} |"
        )
    ranked = [row for row in results["rows"] if row.get("torchrun")]
    if ranked:
        lines += [
            "",
            f"**torchrun --nproc_per_node={s['nproc']}** ({s['train_steps']} steps; per rank: peak "
            "RSS, RssAnon, RssFile, and peak PSS with its anonymous and file-backed parts)",
            "",
            "| pairs | vocab | wall s | rank | RSS | anon | file | PSS | PSS anon | PSS file |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in ranked:
            t = row["torchrun"]
            if not t["ok"]:
                lines.append(f"| {row['pairs']:,} | {row['vocab']} | failed | | | | | | | |")
                continue
            for r in t["ranks"]:
                lines.append(
                    f"| {row['pairs']:,} | {row['vocab']} | {t['seconds']:.1f} | {r['rank']} "
                    f"| {_fmt(r.get('VmHWM'))} | {_fmt(r.get('RssAnon'))} | {_fmt(r.get('RssFile'))} "
                    f"| {_fmt(r.get('Pss'))} | {_fmt(r.get('Pss_Anon'))} | {_fmt(r.get('Pss_File'))} |"
                )
    lines += [
        "",
        "**Limits of the cores** (spaCy's tokenizer alone on both sides of the training lines; "
        "SentencePiece encoding alone of those tokens with the bpe cache's model, on one core; "
        "two cores: the tokenizer in two processes at once, one per core, pairs/s summed. The % of the "
        "limit above divides by one core's rate times the workers, or with two workers by the "
        "two cores' rate when it was measured)",
        "",
        "| pairs | text MB | tokenizer s | tokenizer pairs/s | SentencePiece s "
        "| SentencePiece pairs/s | tokenizer pairs/s, two cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for info in results["corpora"].values():
        out = (_ok(info.get("limits")) or {}).get("output") or {}
        together = (_ok((info.get("limits") or {}).get("together")) or {}).get("pairs_per_s")
        both = "-"
        if together:
            both = f"{sum(together):,.0f} ({' + '.join(f'{r:,.0f}' for r in together)})"
        lines.append(
            f"| {info['pairs']:,} | {info['text_mb']} | {_fmt(out.get('tokenize_seconds'), 1)} "
            f"| {_fmt(out.get('tokenize_pairs_per_s'))} | {_fmt(out.get('encode_seconds'), 1)} "
            f"| {_fmt(out.get('encode_pairs_per_s'))} | {both} |"
        )
    return "\n".join(lines) + "\n"


def _main_process(result: dict[str, Any] | None) -> dict[str, Any]:
    """The sampled record of the measured script itself (the largest process of its tree)."""
    if not result or not result.get("processes"):
        return {}
    return max(result["processes"], key=lambda p: p.get("VmHWM", 0))


def _plot_series(
    rows: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[dict[str, list], dict[str, list]]:
    """(name -> [(pairs, seconds)], name -> [(pairs, MiB)]) of one vocabulary's rows."""
    times: dict[str, list] = {}
    memory: dict[str, list] = {}
    for row in rows:
        x = row["pairs"]
        for workers, p in row["prepare"].items():
            if p["ok"]:
                name = f"prepare, {workers} worker{'s' * (workers != '1')}"
                times.setdefault(name, []).append((x, p["seconds"]))
                memory.setdefault(f"{name} (tree)", []).append((x, p["tree_peak_rss_mib"]))
        load = (_ok(row.get("load")) or {}).get("output")
        if load:
            times.setdefault("load", []).append((x, load["load_seconds"]))
            times.setdefault("epoch batches", []).append((x, load["batches_seconds"]))
            memory.setdefault("load", []).append((x, load["load_peak_mib"]))
        for key in ("train", "evaluate"):
            result = _ok(row.get(key))
            if result:
                name = f"train {settings['train_steps']} steps" if key == "train" else key
                times.setdefault(name, []).append((x, result["seconds"]))
                if result.get("main_peak_mib"):
                    memory.setdefault(name, []).append((x, result["main_peak_mib"]))
        ranks = (_ok(row.get("torchrun")) or {}).get("ranks")
        if ranks:
            peak = max(rank.get("VmHWM", 0) for rank in ranks)
            memory.setdefault(f"torchrun x{len(ranks)}, largest rank", []).append((x, peak))
    return times, memory


def plot(results: dict[str, Any], path: Path) -> None:
    """Seconds and peak RSS against pairs, log-log: one colour per measure, one style per vocab."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(13, 5.5))
    styles = {"word": ("--", "s"), "bpe": ("-", "o")}
    colours: dict[str, Any] = {}
    palette = plt.get_cmap("tab10").colors
    for vocab in dict.fromkeys(row["vocab"] for row in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["vocab"] == vocab), key=lambda r: r["pairs"])
        line, marker = styles.get(vocab, (":", "^"))
        times, memory = _plot_series(rows, results["settings"])
        for ax, series in ((time_ax, times), (mem_ax, memory)):
            for name, points in series.items():
                colour = colours.setdefault(name, palette[len(colours) % len(palette)])
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, line, marker=marker, color=colour, label=f"{name} ({vocab})")
    limits = sorted(
        (info["pairs"], out["tokenize_seconds"])
        for info in results["corpora"].values()
        if (out := (_ok(info.get("limits")) or {}).get("output"))
    )
    if limits:
        xs, ys = zip(*limits, strict=True)
        time_ax.plot(xs, ys, ":", color="black", marker="x", label="spaCy tokenizer alone, 1 core")
    for ax, ylabel in ((time_ax, "seconds"), (mem_ax, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training pairs (synthetic, from Multi30k)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(
        f"Data path against corpus size — {m['commit']}, {m['date'][:10]}, {m['cores']} cores, "
        f"{m['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi30k", type=Path, default=Path("data/multi30k"))
    parser.add_argument("--sizes", help=f"pairs: 20k, 0.1M, 5M, multi30k (default {FULL['sizes']})")
    parser.add_argument("--vocabs", help=f"of {', '.join(VOCABS)} (default both)")
    parser.add_argument("--workers", help=f"data.workers values (default {FULL['workers']})")
    parser.add_argument("--train-steps", type=int, help=f"default {FULL['train_steps']}")
    parser.add_argument("--eval-decode", choices=("beam", "greedy"), help="default beam")
    parser.add_argument("--val-lines", type=int, help="validation lines of the training runs")
    parser.add_argument("--test-lines", type=int, help="test lines to evaluate (0: all, default)")
    parser.add_argument("--nproc", type=int, default=1, help="2: also a torchrun run of 2 ranks")
    parser.add_argument("--limit-lines", type=int, help="lines per side for the limits (all)")
    parser.add_argument("--subword-sample", type=int, help="pass data.subword_sample=N")
    parser.add_argument("--langs", default="de,en")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_data"), help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    parser.add_argument("--plot", type=Path, help="PNG of time and memory against size")
    parser.add_argument(
        "--prepare-only", action="store_true", help="measure the preparations and limits only"
    )
    parser.add_argument("--quick", action="store_true", help=f"a check: {QUICK}")
    parser.add_argument("--report", type=Path, help="only redo the table and plot of this JSON")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.report:
        results = json.loads(args.report.read_text())
        out = args.report
    else:
        for key, value in (QUICK if args.quick else FULL).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.sizes, args.vocabs = args.sizes.split(","), args.vocabs.split(",")
        args.workers = [int(w) for w in args.workers.split(",")]
        for vocab in args.vocabs:
            if vocab not in VOCABS:
                parser.error(f"unknown vocabulary {vocab!r} (choose from {', '.join(VOCABS)})")
        for size in args.sizes:
            try:
                parse_size(size)
            except argparse.ArgumentTypeError as err:
                parser.error(str(err))
        results = Bench(args).run()
        out = args.out
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {out} and {out.with_suffix('.md')}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    sys.path.insert(0, str(SCRIPTS))  # make_corpus.parse_count
    main()
