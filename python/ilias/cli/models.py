"""`ilias models [PATTERN]`: the benchmark's models, their test resolution, pooling, text tower, weights.

A bare word matches as a substring, `*`/`?` as a shell pattern, against our names and the official
scripts' names (shown under `official name` where they differ; both work in `ilias extract` and
`ilias run`). Models marked `-` under `built by` have a custom architecture: extract them with their
own code and `ilias import` the features. `-v` adds hub names, normalisation, the other text towers
of a model (pick one with --text-tower LABEL) and notes.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the benchmark's models", description=__doc__)
    p.add_argument("pattern", nargs="?", help="name filter (substring or shell pattern)")
    p.add_argument("--buildable", action="store_true", help="only models that `ilias extract` can build")
    p.add_argument("-v", "--verbose", action="store_true", help="also show hub names, text towers and notes")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models import list_models

    models = list_models(args.pattern, buildable_only=args.buildable)
    if not models:
        raise ValueError(f"no model matches {args.pattern!r} (`ilias models` lists them all)")
    width = max(len(m.name) for m in models)
    tw = max([len("text tower")] + [len(m.text[0]) for m in models if m.text])
    print(f"{'model':<{width}}  {'res':>4}  {'pool':<4}  {'patch':>5}  {'text tower':<{tw}}  {'built by':<11}  "
          f"{'weights':<30}  official name")
    for m in models:
        patch = str(m.patch) if m.patch else "-"
        text = m.text[0] if m.text else "-"
        print(
            f"{m.name:<{width}}  {m.resolution:>4}  {m.pooling:<4}  {patch:>5}  {text:<{tw}}  "
            f"{m.framework or '-':<11}  {m.weight_source:<30}  {m.official or ''}".rstrip()
        )
        if args.verbose and m.buildable:
            towers = [("published", m.text), *m.text_variants] if m.text else []
            text = "".join(f"; text tower {label}: {a}/{t}" for label, (a, t) in towers)
            print(f"{'':<{width}}    {m.hub_name}{text}; mean {m.mean} std {m.std}{'; ' + m.note if m.note else ''}")
        elif args.verbose:
            print(f"{'':<{width}}    {m.note}")
    unserved = sum(not m.buildable for m in models)
    print(f"{len(models)} models; {unserved} with weights no public hub serves (not buildable here)")
    return 0
