"""GSM-style math problems from reasoning-gym's gsm_symbolic templates, for `clover data tasks`.

reasoning-gym 0.1.25 (PyPI, Apache-2.0) turns 100 GSM8K questions into generator functions (one
template each, `generate_<n>(rng, difficulty)`) that draw new names and numbers from a
`random.Random`. Its package __init__ imports every other task and their third-party
dependencies; the generator files need only the standard library and `reasoning_gym.utils`, so
they are loaded here file by file and nothing needs installing.

    python3 gsm_symbolic.py --package DIR/reasoning_gym --list
        prints the usable template numbers (the package's own `tasks_ok` list) as a JSON list
    python3 gsm_symbolic.py --package DIR/reasoning_gym --templates 3,17,40 --count N --seed S
        prints N problems as JSON lines {"template", "index", "question", "answer"}: problem k is
        drawn from template templates[k % len] with random.Random(S * 1000003 + k); a question
        drawn twice is replaced by the next draw

clover embeds this file and runs it with `python3 -c` (train/data/tasks/gsm_symbolic.rs); which
templates are held out for evaluation is decided there, not here.
"""

import argparse
import ast
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

# What reasoning-gym's GSMSymbolicDataset appends to every question.
SUFFIX = " Give the result as your final answer. Do not include units."
GENERATOR_FILES = ("generators_00_49", "generators_50_99")


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def generators(package):
    """Template number -> generator function, without running reasoning_gym/__init__.py."""
    for name in ("reasoning_gym", "reasoning_gym.arithmetic", "reasoning_gym.arithmetic.gsm_symbolic"):
        stub = types.ModuleType(name)
        stub.__path__ = []
        sys.modules[name] = stub
    load_file("reasoning_gym.utils", package / "utils.py")
    found = {}
    for file in GENERATOR_FILES:
        module = load_file(
            "reasoning_gym.arithmetic.gsm_symbolic." + file,
            package / "arithmetic" / "gsm_symbolic" / (file + ".py"),
        )
        for attr in dir(module):
            if attr.startswith("generate_"):
                found[int(attr[len("generate_"):])] = getattr(module, attr)
    return found


def usable_templates(package):
    """The package's `tasks_ok` list (templates known to generate correctly), read as a literal."""
    path = package / "arithmetic" / "gsm_symbolic" / "gsm_symbolic.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "tasks_ok" for t in node.targets
        ):
            return sorted(ast.literal_eval(node.value))
    raise SystemExit(f"{path}: no tasks_ok list")


def problems(package, templates, count, seed):
    found = generators(package)
    missing = [t for t in templates if t not in found]
    if missing:
        raise SystemExit(f"{package}: no generator for templates {missing}")
    seen = set()
    k = 0
    while len(seen) < count:
        if k >= 50 * count:
            raise SystemExit(f"only {len(seen)} distinct problems after {k} draws")
        template = templates[k % len(templates)]
        example = found[template](random.Random(seed * 1000003 + k), 1.0)
        question = example["question"] + SUFFIX
        if question not in seen:
            seen.add(question)
            yield {"template": template, "index": k, "question": question, "answer": str(example["answer"])}
        k += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the reasoning_gym package directory")
    parser.add_argument("--list", action="store_true", help="print the usable template numbers")
    parser.add_argument("--templates", help="comma-separated template numbers to draw from")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    needed = [args.package / "utils.py"] + [
        args.package / "arithmetic" / "gsm_symbolic" / (f + ".py") for f in ("gsm_symbolic",) + GENERATOR_FILES
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"{args.package} is not reasoning-gym 0.1.25's package directory: no {', '.join(missing)}")
    if args.list:
        print(json.dumps(usable_templates(args.package)))
        return
    if not args.templates or args.count < 1:
        parser.error("--templates and a --count >= 1 are needed without --list")
    templates = [int(t) for t in args.templates.split(",")]
    for problem in problems(args.package, templates, args.count, args.seed):
        print(json.dumps(problem, ensure_ascii=False))


if __name__ == "__main__":
    main()
