"""Commands of stored soft labels: ``relabel`` (FKD label store, LPLD pruning)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any


def cmd_relabel(args: argparse.Namespace) -> int:
    from decoct.cli.common import resolved_config
    from decoct.runtime.distributed import barrier, rank, world_size
    from decoct.runtime.runs import Run, clean_temporaries, lock_run, resolve_artifact, run_kind

    src = resolve_artifact(args.path)  # also finishes a replacement of it that a crash interrupted
    if world_size() > 1:  # torchrun: join now, so the ranks can wait for rank 0 to open the run
        from decoct.runtime.distributed import join_torchrun

        join_torchrun(args.device)
    out_run = None
    out_art = None
    in_place = None
    fresh = bool(args.out) and not Path(args.out).exists()
    if args.out:
        # rank 0 alone checks, clears (--force) and locks the shared run directory
        out_run = Run.open(args.out, resolved_config(args), resume=args.resume, force=args.force) \
            if rank() == 0 else None
        barrier()
        if out_run is None:
            out_run = Run(Path(args.out))
        out_art = out_run.artifact_dir
        if out_run.done:
            if rank() == 0:
                print(f"{args.out}: already done (use --force to redo)")
            return 0
    elif rank() == 0 and src.name == "artifact" and run_kind(src.parent) in ("run", "legacy"):
        in_place = lock_run(src.parent)  # relabelling in place rewrites the run's artifact
    try:
        try:
            dst = _make_store(args, src, out_art)
        except BaseException:
            # a refused option (e.g. a pruning factor that keeps no batch) must not leave a run
            # directory behind; once the artifact exists, it holds resumable work and stays
            if fresh and out_art is not None and not out_art.exists():
                out_run.close()
                shutil.rmtree(args.out, ignore_errors=True)
            raise
        code = _finish(args, src, dst, out_run)
        if in_place is not None:
            clean_temporaries(src.parent)  # what an earlier, killed relabel of this run left
        return code
    finally:
        if in_place is not None:
            in_place.release()


def _make_store(args: argparse.Namespace, src: Path, out_art: Path | None) -> Path:
    """Write the label store (relabel with the teacher, or prune the existing one); its artifact path."""
    from decoct.decoupled.relabel import encode_labels, label_encoding, prune_labels, relabel

    asked = args.label_topk is not None or args.label_fill is not None or args.label_bits is not None
    encoding = None
    if asked:  # checked against the set's classes (from its manifest) before anything runs
        from decoct.formats.artifact import _parse_manifest, _read_manifest

        info = _parse_manifest(_read_manifest(src)).info
        encoding = label_encoding(info, args.label_topk, args.label_fill, args.label_bits)
    if args.teacher is None:
        if encoding is not None:
            return encode_labels(src, encoding, prune=args.prune, out=out_art, force=args.force or out_art is not None)
        if args.prune is None:
            raise ValueError("relabel needs --teacher DIR (to make a label store), or --prune F and/or --label-topk K / "
                             "--label-bits B (to prune or encode the existing full store)")
        return prune_labels(src, args.prune, out=out_art, force=args.force or out_art is not None)
    if args.epochs is None:
        raise ValueError("relabel with --teacher needs --epochs E (the number of stored epochs)")
    return relabel(src, args.teacher, args.epochs, args.batch_size, seed=args.seed, device=args.device,
                   prune=args.prune, out=out_art, force=args.force or out_art is not None,
                   progress=args.progress, encoding=encoding)


def _finish(args: argparse.Namespace, src: Path, dst: Path, out_run: Any) -> int:
    from decoct.decoupled.relabel import open_set
    from decoct.formats.artifact import DistilledSet
    from decoct.formats.label_store import LabelStore, LabelStoreError
    from decoct.runtime.distributed import rank
    from decoct.runtime.runs import Run

    if rank() != 0:
        return 0  # rank 0 wrote the artifact and reports it
    dset = open_set(dst)  # a set above $DECOCT_MAX_SET_BYTES is checked file by file, not decoded whole
    if isinstance(dset, DistilledSet):
        store = LabelStore.from_set(dset)
        st = dset.storage(dst)
    else:  # its store was checked against the streamed fingerprint before it was written
        found = LabelStore.from_label_files(dset.label_files)
        if found is None:
            raise LabelStoreError(f"{dst}: the relabelled set holds no label store")
        store, st = found, dset.storage()
    h = store.header
    info = dict(event="relabelled", source=str(src), epochs=h["epochs"], batch=h["batch"],
                prune=store.prune_factor, label_format=store.encoding.name, stored_batches=store.num_units,
                label_bytes=st["bytes_on_disk"]["labels"], label_payload_bytes=store.payload_bytes(),
                image_bytes=st["bytes_on_disk"]["images"])
    run_dir = out_run.path if out_run is not None else (dst.parent if dst.name == "artifact" else None)
    if run_dir is not None:
        Run(run_dir).log(**info)
    if out_run is not None:
        out_run.finish()
    pr = f", pruned {store.prune_factor}x" if store.prune_factor > 1 else ""
    if not store.encoding.plain:
        pr += f", labels {store.encoding.name}"
    print(f"label store: {h['epochs']} epochs x batch {h['batch']}{pr}: {store.num_units} stored batches, "
          f"{st['bytes_on_disk']['labels']:,} B of labels on disk ({store.payload_bytes():,} B payload), "
          f"{st['bytes_on_disk']['images']:,} B of images -> {dst}")
    return 0


def register(cli: Any) -> None:
    """Add this family's commands to the ``decoct`` parser (see :class:`decoct.cli.common.CommandAdder`)."""
    from decoct.formats.label_pruning import PRUNE_FACTORS

    p = cli.command(
        "relabel", cmd_relabel,
        "FKD-style label store for a distilled set: recorded crops/flips/mixes and the teacher's fp16 logits of "
        "each view, per stored epoch and batch; --prune keeps an LPLD label pool; --label-topk / --label-bits "
        "keep fewer label bytes (top-k classes, per-row quantised logits). Without --teacher, --prune and "
        "--label-topk / --label-bits prune or encode the set's existing full store. Interrupted runs continue "
        "from their finished epochs. A set whose pixels exceed $DECOCT_MAX_SET_BYTES (bytes, default 2 GiB) is "
        "read per batch from its PNG files.")
    p.add_argument("path", help="run directory or artifact directory to relabel")
    p.add_argument("--teacher", default=None, help="teacher directory (decoct squeeze)")
    p.add_argument("--epochs", type=int, default=None, help="stored epochs (LPLD: 300 ImageNet, 100 Tiny)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per stored batch, also the student's batch (default: the dataset's recipe)")
    p.add_argument("--prune", type=int, default=None, choices=[f for f in PRUNE_FACTORS if f > 1],
                   help="LPLD pruning factor (10x r=0.9, 20x 0.95, 30x 0.97, 40x 0.975, 50x 0.98, 100x 0.99)")
    p.add_argument("--label-topk", type=int, default=None, metavar="K",
                   help="keep the K largest classes of each view (int16 ids) instead of all C; K < C "
                        "(LPQLD top-k; see --label-fill)")
    p.add_argument("--label-fill", default=None, metavar="{zero,spread}",
                   help="what the other C-K classes get with --label-topk: zero = keep the top-K logits, target "
                        "softmax over those K at the training temperature, 0 elsewhere (LPQLD MR-k, the default); "
                        "spread = keep the top-K probabilities at the soft protocol's temperature and spread the rest "
                        "evenly over the other classes (FKD marginal smoothing)")
    p.add_argument("--label-bits", type=int, default=None, metavar="{8,4}",
                   help="quantise each view's label values (all C logits, or the K kept) to 8 or 4 bits, with a "
                        "float16 scale and zero point per view (default: fp16 values)")
    p.add_argument("--seed", type=int, default=0, help="seed of batch orders and views")
    p.add_argument("--out", default=None,
                   help="write the relabelled set as a new run directory instead of in place")
