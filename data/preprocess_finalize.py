"""The partitions of one mtp-preprocess job, and dataset.json once they are all complete.

Every run (one partition of --num-partitions, 1 by default) records `partition_<i>.json` in the output folder: the
whole plan (every unit's shard and inputs, in dataset order) and whether its own units are all done. Partitions
running on other nodes into the same folder check one another's records: another partition count or another plan
is refused. The partition that completes last, or `mtp-data finalize OUT`, writes dataset.json: the shards of the
plan in plan order. It is a pure function of the folder's contents, written atomically, so two partitions that
finish at once write the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from .indexed_dataset import token_dtype
from .manifest import DATASET_MANIFEST, TOOL_VERSION, read_manifest, write_json_atomic
from .preprocess_job import JOB_FILE, PreprocessError
from .preprocess_plan import Unit, plan_digest
from .tokenizer import BYTE_TOKENIZER, load_tokenizer
from .tokenizer_sample import TOKENIZER_SAMPLE


def partition_path(out: Path, index: int) -> Path:
    return out / f"partition_{index:05d}.json"


def _partitions(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): read_manifest(p) for p in sorted(out.glob("partition_[0-9]*.json"))}


def unit_state(out: Path, unit: Unit) -> str:
    """'done', 'damaged' (done, but an input was skipped as damaged: a re-run tries it again) or 'todo'."""
    m = out / f"{unit.shard}.json"
    if not m.is_file():
        return "todo"
    manifest = read_manifest(m)
    if manifest["documents"] and not all((out / f"{unit.shard}{ext}").is_file() for ext in (".idx", ".bin")):
        return "todo"
    return "damaged" if manifest.get("damaged") else "done"


def clear_unit(out: Path, unit: Unit) -> None:
    """Remove what an interrupted worker left of a unit that is not done (its manifest is written last)."""
    for p in [out / f"{unit.shard}{ext}" for ext in (".json", ".idx", ".bin", ".bin.tmp", ".idx.tmp")] + \
            list(out.glob(f".{unit.shard}.json.tmp-*")):
        p.unlink(missing_ok=True)


def check_partitions(out: Path, units: list[Unit], num_partitions: int, index: int) -> None:
    digest = plan_digest(units)
    for i, rec in _partitions(out).items():
        if i == index and rec["num_partitions"] == num_partitions:
            continue  # this partition's own record, from an earlier run: replaced
        if rec["num_partitions"] != num_partitions:
            raise PreprocessError(f"{out}: holds partition {i} of a {rec['num_partitions']}-partition run, this run "
                                  f"has --num-partitions {num_partitions} (run every partition with the same count)")
        if rec["plan"] != digest:
            raise PreprocessError(f"{out}: partition {i} of {num_partitions} planned other work ({len(rec['units'])} "
                                  f"shards from {len(rec['sources'])} inputs, plan {rec['plan']}) than this run "
                                  f"({len(units)} shards from {len({f for u in units for f in u.files})} inputs, plan "
                                  f"{digest}): every partition must be given the same inputs and --shard-bytes")


def record_partition(out: Path, units: list[Unit], num_partitions: int, index: int, complete: bool) -> None:
    rec = {"num_partitions": num_partitions, "index": index, "complete": complete, "plan": plan_digest(units),
           "sources": list(dict.fromkeys(f for u in units for f in u.files)),
           "units": [{"shard": u.shard, "inputs": list(u.files), "sizes": list(u.sizes), "start": u.start,
                      "end": u.end} for u in units]}
    path = partition_path(out, index)
    if not path.is_file() or read_manifest(path) != rec:  # a run that changes nothing leaves the folder as it was
        write_json_atomic(path, rec)


def pending_partitions(out: Path) -> list[str]:
    """Why dataset.json cannot be written yet: one entry per partition that has not completed."""
    recs = _partitions(out)
    if not recs:
        return [f"no partition has run in {out}"]
    n = next(iter(recs.values()))["num_partitions"]
    why = []
    for i in range(n):
        if i not in recs:
            why.append(f"partition {i} of {n} has not run")
        elif not recs[i]["complete"]:
            units = [Unit(tuple(u["inputs"]), tuple(u["sizes"]), u["start"], u["end"]) for u in recs[i]["units"]]
            done = sum(unit_state(out, u) != "todo" for u in units[i::n])
            why.append(f"partition {i} of {n} has not completed ({done} of {len(units[i::n])} of its shards done)")
    return why


def finalize(out: Path, log=print) -> dict:
    """Write out/dataset.json from the complete partitions; refuses, naming them, while any is missing."""
    out = Path(out)
    if not (out / JOB_FILE).is_file():
        raise PreprocessError(f"{out}: no {JOB_FILE}; not an mtp-preprocess output folder")
    why = pending_partitions(out)
    if why:
        raise PreprocessError(f"{out}: cannot write {DATASET_MANIFEST}: " + "; ".join(why) +
                              " (run the missing partitions with the same command and their --partition-index)")
    recs = _partitions(out)
    plan = next(iter(recs.values()))
    job = read_manifest(out / JOB_FILE)
    spec = job["tokenizer"]
    if spec == "trained":
        spec = str((out / "tokenizer.model").resolve())
    tok = load_tokenizer(spec)
    if tok.sha256 != job.get("tokenizer_sha256", tok.sha256):
        raise PreprocessError(f"{out}: the tokenizer {spec} has sha256 {tok.sha256}, but {JOB_FILE} records "
                              f"{job['tokenizer_sha256']}")
    manifests = {u["shard"]: read_manifest(out / f"{u['shard']}.json") for u in plan["units"]}
    damaged = {f: why for m in manifests.values() for f, why in m.get("damaged", {}).items()}
    shards, totals = [], {"documents": 0, "tokens": 0, "max_token_id": -1}
    for u in plan["units"]:
        m = manifests[u["shard"]]
        # A damaged input split over several shards is left out whole, as one in a single shard is.
        if not m["documents"] or (u["end"] is not None and u["inputs"][0] in damaged):
            continue
        shards.append(u["shard"])
        totals["documents"] += m["documents"]
        totals["tokens"] += m["tokens"]
        totals["max_token_id"] = max(totals["max_token_id"], m["max_token_id"])
    summary = {"shards": shards, "tokenizer": BYTE_TOKENIZER if tok.path is None else str(tok.path.resolve()),
               "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
               "eod_id": tok.eod_id if job["append_eod"] else None, "dtype": str(token_dtype(tok.vocab_size)),
               **totals, "sources": plan["sources"], "skipped_inputs": damaged, "tool_version": TOOL_VERSION}
    if (out / TOKENIZER_SAMPLE).is_file():
        summary["tokenizer_sample"] = read_manifest(out / TOKENIZER_SAMPLE)
    keep = {u["shard"] for u in plan["units"]}
    for p in [*out.glob("shard_*"), *out.glob(".shard_*.json.tmp-*")]:  # units no longer in the plan (an input
        if p.name.lstrip(".").split(".")[0] not in keep:                # changed size), done or left unfinished
            p.unlink(missing_ok=True)
    manifest = out / DATASET_MANIFEST
    if not manifest.is_file() or read_manifest(manifest) != summary:
        write_json_atomic(manifest, summary)
    return summary
