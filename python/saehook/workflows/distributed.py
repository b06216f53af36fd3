"""Dataset capture on a Ray cluster (README "Scaling out with Ray").

    from saehook.workflows.distributed import capture_on_ray
    capture_on_ray("model.gguf", {12: "layer12.sae.pt"}, "docs.jsonl", "s3://bucket/capture", address="auto")

The documents are cut into work units of `shard_docs` documents; unit i is shard i of a local
capture (`datasets.shard_table`, `datasets.shard_name`), so the directory it leaves is the one
`saehook capture` writes (manifest.json, docs.parquet, shard-NNNNN.parquet) and `stats`,
`compare`, `classify` read either. Each Ray actor opens the model and the SAEs once
(`engines.open_engine`, SAE files mmapped) and turns units into shard tables.

Exactly once. An actor writes its shard under a temporary name unique to the attempt
(.shard-NNNNN.parquet.<attempt>.tmp) and returns; only the driver commits, by moving that file
to shard-NNNNN.parquet (a rename on a local or POSIX filesystem). A committed shard is the
record that its unit is done: the manifest describes the capture (identical to a local
capture's, so either kind of run resumes the other), and the set of shard files present is the
set of committed units. A unit whose actor dies is queued again and goes to another actor (a
replacement is started); an attempt that finishes after its unit was committed is discarded. A
driver that dies leaves at most temporary files, which the next run deletes before it resumes
from the shards present. Rows are therefore neither lost nor written twice.

Memory: the driver holds the documents' text (as a local capture does); each actor holds its
model and mmapped SAEs and one unit's rows while it writes them (about k * 8 + 300 bytes a row).
On disk a row takes about k * 9 bytes (892 bytes per token at k = 100, bench_ray_capture.py).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import uuid
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import datasets

TMP_SUFFIX = ".tmp"


class CaptureIncomplete(RuntimeError):
    """Some units could not be captured; the others are committed and a rerun resumes.
    `failures` lists one dict per failed unit (unit, documents, actor, doc_id, text, error)."""

    def __init__(self, message: str, failures: List[dict], result: dict):
        super().__init__(message)
        self.failures, self.result = failures, result


# ---- storage: a local path, a URI, or any pyarrow.fs filesystem ----

def resolve_output(out: str, filesystem=None) -> Tuple[object, str]:
    """(pyarrow filesystem, root path inside it) for `out`: a local path, a URI that
    pyarrow.fs.FileSystem.from_uri understands (file://, s3://, gs://, hdfs://...), or a path
    inside `filesystem` (any pyarrow.fs.FileSystem, e.g. a SubTreeFileSystem)."""
    from pyarrow import fs as pafs

    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}")
        return filesystem, out.rstrip("/") or "/"
    if "://" in out:
        try:
            fs, root = pafs.FileSystem.from_uri(out)
        except Exception as e:  # pyarrow says which scheme or part it could not use
            raise ValueError(f"--out {out!r}: not a filesystem URI pyarrow can open ({e})") from None
        return fs, root.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(out)


def _local_dir(fs, root: str) -> Optional[str]:
    """The OS path of root when the filesystem is the local disk (for the directory lock)."""
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return root
    if isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem):
        return os.path.join(fs.base_path, root.lstrip("/"))
    return None


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _exists(fs, path: str) -> bool:
    from pyarrow import fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_atomic(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _write_table_atomic(fs, path: str, table) -> None:
    import pyarrow.parquet as pq

    tmp = _join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def committed_units(fs, root: str, n_units: int) -> set:
    """The units whose shard file is present (committed)."""
    from pyarrow import fs as pafs

    names = {os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    return {i for i in range(n_units) if datasets.shard_name(i) in names}


def _remove_stale_temporaries(fs, root: str) -> int:
    """Temporary shards of attempts that never committed (a killed driver or actor)."""
    from pyarrow import fs as pafs

    n = 0
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = os.path.basename(info.path)
        if name.endswith(TMP_SUFFIX) and (name.startswith(".shard-") or name.startswith(".docs.parquet")
                                          or name.startswith(datasets.MANIFEST)):
            fs.delete_file(info.path)
            n += 1
    return n


# ---- the actor ----

SAELoader = Callable[[], Mapping[int, "datasets.SAE"]]


def sae_loader(saes: Union[Mapping[int, str], SAELoader], k: Optional[int] = None) -> SAELoader:
    """What each actor (and the driver, for the manifest's fingerprints) calls to get its
    {layer: SAE}: a function as given (it travels to the actors: e.g. functools.partial of a
    loader; the CLI passes its --sae/--layers/--k loader), or {layer: SAE file path}, each file
    loaded with saehook.load(path, k=k) (mmapped, not copied)."""
    if callable(saes):
        return saes
    if isinstance(saes, Mapping) and saes:
        for layer, path in saes.items():
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"saes[{layer!r}] is a {type(path).__name__}: pass SAE file paths (each actor loads "
                                "its own copy), or a function that returns {layer: SAE}")
        return functools.partial(_load_paths, {layer: os.fspath(p) for layer, p in saes.items()}, k)
    raise TypeError("saes must be {layer: SAE file path} or a function returning {layer: SAE}, "
                    f"got {type(saes).__name__}")


def _load_paths(paths: Mapping[int, str], k: Optional[int]) -> Dict[int, "datasets.SAE"]:
    from .. import load

    out = {}
    for layer, path in paths.items():
        obj = load(path, k=k)
        if not isinstance(obj, datasets.SAE):
            raise ValueError(f"{path} holds several layers: pass the one file of layer {layer}")
        out[layer] = obj
    return out


class CaptureWorker:
    """A Ray actor (see capture_on_ray): the model and the SAEs, loaded once, turning units into
    temporary shard files."""

    def __init__(self, model: str, engine: Optional[str], load_saes: SAELoader, max_tokens: int, engine_kwargs: dict):
        from ..engines import open_engine

        self.engine = open_engine(model, engine, **engine_kwargs)  # llama.cpp first: before anything loads libgomp
        self.saes = dict(load_saes())
        datasets._check_inputs(self.engine, self.saes, [{"text": ""}])
        self.max_tokens = max_tokens

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def process(self, unit: int, first_doc_id: int, docs: List[dict], fs, root: str) -> dict:
        """Writes unit's shard to a temporary file and says where; a document that raises is
        returned as the unit's failure (the actor stays usable)."""
        current = [first_doc_id]

        def done(doc_id):
            current[0] = doc_id + 1

        try:
            table = datasets.shard_table(self.engine, self.saes, docs, first_doc_id, self.max_tokens, on_document=done)
        except Exception as e:
            doc_id = current[0]
            return {"unit": unit, "error": f"{type(e).__name__}: {e}", "doc_id": doc_id,
                    "text": docs[doc_id - first_doc_id]["text"]}
        tmp = _join(root, f".{datasets.shard_name(unit)}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        import pyarrow.parquet as pq

        pq.write_table(table, tmp, filesystem=fs)
        return {"unit": unit, "tmp": tmp, "rows": table.num_rows}


# ---- the driver ----

def capture_on_ray(model: str, saes: Union[Mapping[int, str], SAELoader], docs: Union[str, Sequence[dict]], out: str, *,
                   address: Optional[str] = None, k: Optional[int] = None, engine: Optional[str] = None,
                   shard_docs: int = 64, max_tokens: int = 512, num_actors: Optional[int] = None,
                   num_cpus: float = 1, num_gpus: float = 0, engine_kwargs: Optional[dict] = None,
                   filesystem=None, max_attempts: int = 3, manifest_extra: Optional[dict] = None,
                   progress: Optional[Callable[[int, int], None]] = None, on_commit: Optional[Callable[[int], None]] = None,
                   runtime_env: Optional[dict] = None) -> dict:
    """Captures `docs` (a data file or a list of {"text", "label"?}) into `out` on a Ray cluster.

    model: a GGUF file or transformers directory every node can read at that path; saes:
    {layer: SAE file path} (loaded with saehook.load(path, k=k); the files at the same path on
    every node) or a function returning {layer: SAE} that every actor calls (`sae_loader`).
    address: as ray.init takes it (None: RAY_ADDRESS or a new local cluster; "auto";
    "ray://host:10001"); when Ray is already initialised, that cluster is used.
    out: a local path, a URI (file://, s3://...) or a path inside `filesystem`; every node must
    reach it. num_actors: default as many as the cluster has room for (CPUs / num_cpus, GPUs /
    num_gpus), at most one per unit. A unit is tried on up to `max_attempts` actors before it is
    reported as failed. progress(documents committed, documents) after each commit; on_commit(unit).

    Returns {"out", "shards", "written", "skipped", "rows", "actors", "actor_failures",
    "retried_units"}. Units that failed (a document that raises, or `max_attempts` dead actors)
    are reported together, with the document, in a CaptureIncomplete error once every other unit
    is committed; a rerun resumes."""
    import ray

    shard_docs = datasets._positive_int("shard_docs", shard_docs)
    max_tokens = datasets._positive_int("max_tokens", max_tokens)
    max_attempts = datasets._positive_int("max_attempts", max_attempts)
    if num_actors is not None:
        num_actors = datasets._positive_int("num_actors", num_actors)
    if isinstance(docs, str):
        docs = datasets.read_documents(docs)
    docs = list(docs)
    load_saes = sae_loader(saes, k)
    saes = dict(load_saes())  # mmapped: the driver reads only the fingerprints' samples
    fs, root = resolve_output(out, filesystem)
    datasets._check_inputs(_ModelFacts(model, engine), saes, docs)
    manifest = datasets.capture_manifest(saes, docs, shard_docs, max_tokens, manifest_extra)
    del saes

    engine_kwargs = dict(engine_kwargs or {})
    if _engine_kind(model, engine) == "llama":
        engine_kwargs.setdefault("threads", max(1, int(num_cpus)))  # llama.cpp's default is every core of the node
    fs.create_dir(root, recursive=True)
    local = _local_dir(fs, root)
    lock = datasets._directory_lock(local) if local else contextlib.nullcontext()  # object stores: no lock
    started_ray = not ray.is_initialized()
    with lock:
        _start_or_resume(fs, root, manifest, docs, out)
        n_units = (len(docs) + shard_docs - 1) // shard_docs
        done = committed_units(fs, root, n_units)
        if started_ray:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        try:
            return _run(ray, fs, root, model, engine, load_saes, max_tokens, engine_kwargs, docs,
                        shard_docs, n_units, done, num_actors, num_cpus, num_gpus, max_attempts, progress, on_commit, out)
        finally:
            if started_ray:
                ray.shutdown()


def _engine_kind(model: str, engine: Optional[str]) -> str:
    return engine or ("hf" if os.path.isdir(model) else "llama")  # as engines.open_engine decides


class _ModelFacts:
    """What _check_inputs needs of an engine, read on the driver from the GGUF header or the
    transformers config (no weights loaded), so a wrong layer or SAE width fails before any
    actor starts. Each actor checks again against the model it loaded."""

    def __init__(self, model: str, engine: Optional[str]):
        if _engine_kind(model, engine) == "llama":
            from ..engines.protocol import gguf_model_facts

            if not os.path.isfile(model):
                raise FileNotFoundError(f"{model}: not a GGUF file on this machine (every node needs it at this path)")
            facts = gguf_model_facts(model)
            self.n_layer, self.d_model = facts["n_layer"], facts["n_embd"]
        else:
            try:
                with open(os.path.join(model, "config.json")) as f:
                    cfg = json.load(f)
            except OSError as e:
                raise FileNotFoundError(f"{model}: not a transformers model directory ({e})") from None
            cfg = cfg.get("text_config", cfg)
            self.n_layer, self.d_model = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
        if not self.n_layer or not self.d_model:
            raise ValueError(f"{model}: its header names no layer count or width")


def _start_or_resume(fs, root: str, manifest: dict, docs, out: str) -> None:
    mpath = _join(root, datasets.MANIFEST)
    if _exists(fs, mpath):
        with fs.open_input_stream(mpath) as f:
            old = json.loads(f.read().decode("utf-8"))
        if old != manifest:
            raise ValueError(datasets._manifest_mismatch(out, old, manifest))
    _remove_stale_temporaries(fs, root)
    if not _exists(fs, mpath):
        _write_atomic(fs, mpath, json.dumps(manifest, indent=1).encode())
    dpath = _join(root, "docs.parquet")
    if not _exists(fs, dpath):
        _write_table_atomic(fs, dpath, datasets.docs_table(docs))


def _run(ray, fs, root, model, engine, load_saes, max_tokens, engine_kwargs, docs, shard_docs, n_units, done,
         num_actors, num_cpus, num_gpus, max_attempts, progress, on_commit, out) -> dict:
    todo = collections.deque(i for i in range(n_units) if i not in done)
    result = {"out": out, "shards": n_units, "written": 0, "skipped": len(done), "rows": 0,
              "actors": 0, "actor_failures": 0, "retried_units": []}
    n_docs_done = sum(min(len(docs), (i + 1) * shard_docs) - i * shard_docs for i in done)
    if progress:
        progress(n_docs_done, len(docs))
    if not todo:
        return result
    if num_actors is None:
        res = ray.cluster_resources()
        room = [res.get("CPU", 1) / num_cpus if num_cpus else float("inf"),
                res.get("GPU", 0) / num_gpus if num_gpus else float("inf")]
        num_actors = max(1, int(min(room)))
    num_actors = min(num_actors, len(todo))

    Worker = ray.remote(CaptureWorker)
    run_id = uuid.uuid4().hex[:8]
    actors: Dict[int, object] = {}
    serial = [0]

    def start_actor():
        i = serial[0]
        serial[0] += 1
        actors[i] = Worker.options(name=f"saehook-capture-{run_id}-{i}", num_cpus=num_cpus, num_gpus=num_gpus,
                                   max_restarts=0).remote(
            model, engine, load_saes, max_tokens, engine_kwargs)
        return i

    for _ in range(num_actors):
        start_actor()
    try:  # a model or SAE that no node can load is one clear error, not a retry per unit
        placed = ray.get([h.where.remote() for h in actors.values()])
    except ray.exceptions.RayActorError as e:
        for h in actors.values():
            ray.kill(h)
        raise RuntimeError(f"the capture actors could not load {model} and the SAEs: {e}") from None
    result["nodes"] = len({p["node"] for p in placed})
    depth = 2  # units queued per actor: the next one is ready when the current one ends
    in_flight: Dict[object, Tuple[int, int]] = {}  # ref -> (actor, unit)
    load: Dict[int, int] = collections.Counter()
    attempts: Dict[int, int] = collections.Counter()
    failures: List[dict] = []
    committed = set(done)
    dead_reasons: List[str] = []

    def submit():
        for a in list(actors):
            while todo and load[a] < depth:
                unit = todo.popleft()
                lo = unit * shard_docs
                attempts[unit] += 1
                ref = actors[a].process.remote(unit, lo, docs[lo: lo + shard_docs], fs, root)
                in_flight[ref] = (a, unit)
                load[a] += 1

    submit()
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        a, unit = in_flight.pop(ref)
        load[a] -= 1
        lo, hi = unit * shard_docs, min(len(docs), (unit + 1) * shard_docs)
        try:
            r = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            if a in actors:  # first news of this actor's death: make sure it is gone, and replace it
                ray.kill(actors.pop(a))
                result["actor_failures"] += 1
                dead_reasons.append(f"actor {a}: {_first_line(e)}")
                if result["actor_failures"] <= n_units * max_attempts:  # each death spends one unit's attempt
                    start_actor()
            if unit in committed:
                continue
            if attempts[unit] < max_attempts:
                todo.appendleft(unit)
                if unit not in result["retried_units"]:
                    result["retried_units"].append(unit)
            else:
                failures.append({"unit": unit, "documents": [lo, hi - 1], "actor": a, "doc_id": None, "text": None,
                                 "error": f"its actor died {attempts[unit]} times: {_first_line(e)}"})
            submit()
            continue
        except ray.exceptions.RayTaskError as e:  # not raised by process (it returns errors); the actor is broken
            failures.append({"unit": unit, "documents": [lo, hi - 1], "actor": a, "doc_id": None, "text": None,
                             "error": _first_line(e)})
            submit()
            continue
        if "error" in r:
            failures.append({"unit": unit, "documents": [lo, hi - 1], "actor": a, "doc_id": r["doc_id"],
                             "text": r["text"], "error": r["error"]})
        elif unit in committed:  # a late duplicate attempt: its unit is already in place
            fs.delete_file(r["tmp"])
        else:
            fs.move(r["tmp"], _join(root, datasets.shard_name(unit)))  # the commit
            committed.add(unit)
            result["written"] += 1
            result["rows"] += r["rows"]
            n_docs_done += hi - lo
            if progress:
                progress(n_docs_done, len(docs))
            if on_commit:
                on_commit(unit)
        submit()
        if not actors and (todo or in_flight):
            break
    result["actors"] = serial[0]
    for h in actors.values():
        ray.kill(h)
    if len(committed) == n_units:
        _remove_stale_temporaries(fs, root)  # attempts of dead actors that never returned
    if failures or len(committed) < n_units:
        lines = [_describe(f) for f in sorted(failures, key=lambda f: f["unit"])]
        missing = n_units - len(committed) - len(failures)
        if missing:
            lines.append(f"{missing} more units not run: every actor failed ({'; '.join(dead_reasons[-3:])})")
        raise CaptureIncomplete(f"{out}: {len(committed)} of {n_units} shards committed; "
                                f"rerun the same command to resume. Failed:\n  " + "\n  ".join(lines), failures, result)
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _describe(f: dict) -> str:
    where = f"unit {f['unit']} (documents {f['documents'][0]}..{f['documents'][1]}) on actor {f['actor']}"
    if f["doc_id"] is not None:
        text = f["text"] if len(f["text"]) <= 60 else f["text"][:57] + "..."
        return f"{where}: document {f['doc_id']} ({text!r}): {f['error']}"
    return f"{where}: {f['error']}"
