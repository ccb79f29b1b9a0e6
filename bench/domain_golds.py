"""Does every gold command of a domain do something, for every task its template makes? Runs
each template's gold for every instantiation in the domain's file system (the sandbox), and
prints the failures by template, with how many instantiations each template has.

    python bench/domain_golds.py                       # the built-in bash domain
    python bench/domain_golds.py --tasks-file my.json  # a domain of your own with golds
"""
import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import intrinsic_self_improvement as isi  # noqa: E402
import support.domain_eval  # noqa: E402
import support.nl2bash  # noqa: E402
import support.tasks  # noqa: E402
from support.sandbox import Sandbox  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="bash")
    parser.add_argument("--tasks-file")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    domain = support.tasks.load_domain(args.tasks_file, args.domain)
    start = time.perf_counter()
    with Sandbox({"domain": (support.tasks.environment_script(domain), None)}, workers=args.workers) as sandbox:
        failures = support.domain_eval.check_golds(domain, sandbox, isi.execution_verdict,
                                                   support.nl2bash.intercode_reward)
    slots = domain.get("slots", {})
    by_template = collections.defaultdict(list)
    for failure in failures:
        template = next(t for t in domain["templates"] if "gold" in t and support.tasks.template_pattern(
            t, slots).fullmatch(failure["task"]))
        by_template[template["task"]].append(failure)
    total = sum(len(support.domain_eval.instantiations(t, slots)) for t in domain["templates"] if "gold" in t)
    for template in domain["templates"]:
        bad = by_template.get(template["task"], [])
        n = len(support.domain_eval.instantiations(template, slots))
        print(f"{len(bad):4d}/{n:<4d} {template['task']}")
        for failure in bad[:3]:
            print(f"            {failure['gold']}: {failure['why']}")
    print(f"{len(failures)} of {total} instantiations fail ({time.perf_counter() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
