"""`ilias adapt apply|train|info`: linear adaptation layers, the paper's `normalize(W x + b)`.

    ilias adapt apply --weights siglip.pth stores/image_queries stores/positives stores/distractors --out adapted/
    ilias search --queries adapted/image_queries --db adapted/positives adapted/distractors --out r.npz
    #   or in one step: ilias search ... --adapt siglip.pth   (adapts what is not yet adapted)
    ilias adapt train uned_features/ --labels uned_paths_1M.txt --out siglip.pth [--epochs 5] [--seed 0]
    ilias adapt info siglip.pth

apply writes one adapted store per STORE under --out (same name), float16 for image features,
streamed shard by shard; rerun it after an interruption to continue. Official layers: one
`<model>.pth` per model, a torch state_dict with `layer.weight` (out x in) and `layer.bias`
(reading .pth needs torch: pip install 'ilias-core[models]'; an .npz with the same keys needs
only numpy). train follows the official recipe (Linear d -> 512, Xavier init, L2 norm; cosine
classifier over the (label, domain) classes of the `path,label,domain` list; cross-entropy on
16 x cosine; Adam lr 1e-3, weight decay 1e-6, batch 128) and writes the same layout.
"""

from __future__ import annotations

import argparse
import sys

from .options import POSITIVE, SEED, THREADS, number


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="apply or train linear adaptation layers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("apply", help="write adapted copies of stores: normalize(W x + b)")
    a.add_argument("stores", nargs="+", metavar="STORE", help="stores to adapt (queries and database alike)")
    a.add_argument("--weights", required=True, metavar="W.pth", help="adaptation layer (.pth state_dict or .npz)")
    a.add_argument("--out", required=True, metavar="DIR", help="folder of the adapted stores (one per STORE, same name)")
    a.add_argument("--dtype", choices=["float16", "float32"], help="stored type (default: the source's)")
    a.add_argument("--replace", action="store_true", help="rewrite outputs made with other weights or from other stores")
    a.add_argument("--threads", type=THREADS, default=0, help="BLAS threads (default 0: as numpy has them)")
    a.set_defaults(run=run_apply)

    t = actions.add_parser("train", help="train a layer on labelled features (UnED), the official recipe")
    t.add_argument("features", metavar="STORE", help="features of the training images (e.g. the UnED subset)")
    t.add_argument("--labels", required=True, metavar="LIST.txt", help="path,label,domain per line (one per store row)")
    t.add_argument("--out", required=True, metavar="W.pth", help="where to write the state_dict (and W.pth.json)")
    t.add_argument("--dim", type=POSITIVE, default=512, help="output dimension (default 512)")
    t.add_argument("--epochs", type=POSITIVE, default=5, help="epochs (default 5)")
    t.add_argument("--batch-size", type=POSITIVE, default=128, help="batch size (default 128)")
    t.add_argument("--lr", type=number(0, strict=True), default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=number(0), default=1e-6, help="Adam weight decay (default 1e-6)")
    t.add_argument("--scale", type=number(0, strict=True), default=16.0, help="logit scale of the cosine classifier (default 16)")
    t.add_argument("--seed", type=SEED, default=0, help="seed of the initialisation and the batches (default 0)")
    t.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    t.set_defaults(run=run_train)

    i = actions.add_parser("info", help="what a weights file holds")
    i.add_argument("weights", metavar="W.pth")
    i.set_defaults(run=run_info)


def run_apply(args) -> int:
    import time

    from ..adapt import apply_many, blas_hint, load_weights
    from ..store import open_stores

    ad = load_weights(args.weights)
    hint = blas_hint()
    if hint:
        print(f"ilias adapt: note: {hint}", file=sys.stderr)
    t0 = time.monotonic()
    outs = apply_many(ad, args.stores, args.out, dtype=args.dtype, replace=args.replace, threads=args.threads,
                      progress=True)
    for o in outs:
        rows = sum(st.count for st in open_stores(o))
        print(f"{o}: {rows:,} rows x {ad.out_dim} ({ad.label})")
    print(f"done in {time.monotonic() - t0:.1f}s")
    return 0


def run_train(args) -> int:
    from ..adapt import Recipe, train

    recipe = Recipe(dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, scale=args.scale, seed=args.seed)
    record = train(args.features, args.labels, args.out, recipe, device=args.device, progress=True,
                   say=lambda m: print(m, file=sys.stderr))
    print(f"{record['weights']}: Linear({record['in_dim']} -> {record['out_dim']}) trained on {record['rows']:,} rows, "
          f"{record['classes']:,} classes, {recipe.epochs} epochs on {record['device']} in {record['seconds']:.1f}s; "
          f"final mean loss {record['epoch_losses'][-1]:.4f}; sha256 {record['sha256'][:12]}")
    return 0


def run_info(args) -> int:
    from ..adapt import load_weights

    ad = load_weights(args.weights)
    bias = "with bias" if ad.bias is not None else "no bias"
    print(f"{ad.path}: Linear({ad.in_dim} -> {ad.out_dim}), {bias}, sha256 {ad.sha256}")
    return 0
