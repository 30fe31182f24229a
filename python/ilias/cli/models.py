"""`ilias models [PATTERN]`: the benchmark's models, their test resolution, pooling and weights.

A bare word matches as a substring, `*`/`?` as a shell pattern. Models marked `-` under `built by`
have a custom architecture: extract them with their own code and `ilias import` the features.
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
    print(f"{'model':<{width}}  {'res':>4}  {'pool':<4}  {'patch':>5}  {'text':<4}  {'built by':<11}  weights")
    for m in models:
        patch = str(m.patch) if m.patch else "-"
        print(
            f"{m.name:<{width}}  {m.resolution:>4}  {m.pooling:<4}  {patch:>5}  {'yes' if m.text else '-':<4}  "
            f"{m.framework or '-':<11}  {m.weight_source}"
        )
        if args.verbose and m.buildable:
            text = f", text tower {m.text[0]}/{m.text[1]}" if m.text else ""
            print(f"{'':<{width}}    {m.hub_name}{text}; mean {m.mean} std {m.std}{'; ' + m.note if m.note else ''}")
        elif args.verbose:
            print(f"{'':<{width}}    {m.note}")
    unserved = sum(not m.buildable for m in models)
    print(f"{len(models)} models; {unserved} with weights no public hub serves (not buildable here)")
    return 0
