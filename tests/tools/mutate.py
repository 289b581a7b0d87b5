"""Mutation testing of memdiff.py's science: plant one-line bugs, count the ones the suite catches.

    OMP_NUM_THREADS=1 nice -n 19 python tests/tools/mutate.py [--sections 2,5] [--every K --seed S]
                                                        [--jobs J] [--list] [--out FILE]

Each mutant changes one node of the syntax tree of sections 1-9 (not the appendix that reads the
study's snapshots): a comparison (< <=, > >=, == !=, in / not in, is / is not), an arithmetic
operator (+ -, * /, ** *, // /, % *, also in +=), a number (an int n -> n + 1, a float x -> 2x, 0 -> 1;
function defaults included, so a changed paper constant is a mutant), a boolean (True / False,
and / or, `not` dropped), a unary minus dropped, or two adjacent positional arguments swapped. Mutants
inside error messages (f-strings) and docstrings are not made.

Each mutant runs the non-slow tests of its section (SECTION_TESTS) with -x: those of them that run
the mutated statement, as a traced run of the unmutated tests records (lines run while a test file is
collected or its fixtures set up count for all of its tests), or all of them when no traced test runs
it (a line run at import, such as a constant, or only in a spawned process) and for a function's
defaults (which tests read through `inspect` too). The runner imports torch, pytest and hypothesis
once; each mutant runs in a forked child that compiles the mutated tree into a fresh `memdiff`
module (and writes it where processes a test spawns import it) and then imports the test files,
so nothing built from the original module leaks in. A child that
runs longer than the timeout is killed and counted apart. Hypothesis runs the 'ci' profile's
examples (derandomized) without shrinking: the same mutant gives the same verdict on every run.

Output: one line per surviving mutant, then the score killed / (killed + survived), timeouts counted
as killed and shown apart. Mutants listed in tests/tools/MUTANTS.md as equivalent are reported as such when
their description matches (section, function and the change), and leave the score's denominator.
"""

import argparse
import ast
import copy
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / 'memdiff.py'
EQUIVALENT_FILE = ROOT / 'tests' / 'tools' / 'MUTANTS.md'

# The test files that check each section (the suite is organised by section).
SECTION_TESTS = {
    1: ['test_data.py', 'test_probes.py'],     # held_out: the probes' held-out images
    2: ['test_network.py'],
    3: ['test_network.py'],
    4: ['test_network.py', 'test_training.py', 'test_probes.py'],
    5: ['test_sampler.py', 'test_measure.py'],
    6: ['test_optimum.py', 'test_probes.py'],
    7: ['test_metric.py'],
    8: ['test_ranks.py', 'test_training.py'],      # test_ranks first: seconds, and it alone runs DDP
    9: ['test_ranks.py', 'test_search.py', 'test_tau.py', 'test_metric.py', 'test_measure.py',
        'test_probes.py'],
}

COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
           ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
           ast.IsNot: ast.Is}
ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
         ast.Pow: ast.Mult, ast.FloorDiv: ast.Div, ast.Mod: ast.Mult, ast.RShift: ast.LShift,
         ast.LShift: ast.RShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SYMBOL = {ast.Lt: '<', ast.LtE: '<=', ast.Gt: '>', ast.GtE: '>=', ast.Eq: '==', ast.NotEq: '!=',
          ast.In: 'in', ast.NotIn: 'not in', ast.Is: 'is', ast.IsNot: 'is not', ast.Add: '+',
          ast.Sub: '-', ast.Mult: '*', ast.Div: '/', ast.Pow: '**', ast.FloorDiv: '//',
          ast.Mod: '%', ast.RShift: '>>', ast.LShift: '<<', ast.BitAnd: '&', ast.BitOr: '|',
          ast.And: 'and', ast.Or: 'or'}


def sections(lines):
    """[(section number, first line, last line)] from the '#----' rules followed by '# N.'."""
    starts = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith('#----'):
            m = re.match(r'# (\d+)\. ', lines[i + 1])
            starts.append((int(m.group(1)) if m else None, i + 1))
    out = []
    for (num, start), (_, end) in zip(starts, starts[1:] + [(None, len(lines) + 1)]):
        if num is not None:
            out.append((num, start, end - 1))
    return out


def parents(tree):
    """(node -> enclosing function or class name, node -> (first, last) line of its innermost
    statement, ids of skipped nodes: docstrings, f-strings)."""
    owner, span, skip = {}, {}, set()

    def visit(node, name, stmt):
        if isinstance(node, ast.stmt):
            stmt = (node.lineno, node.end_lineno)
        if isinstance(node, ast.arguments):             # a default: read by inspect as well as
            stmt = None                                 # by calls, so every test of the section
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name if name is None or isinstance(node, ast.ClassDef) else \
                f'{name}.{node.name}'
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0]))
        if isinstance(node, (ast.JoinedStr, ast.Raise)) or id(node) in skip:
            for sub in ast.walk(node):
                skip.add(id(sub))
        owner[id(node)], span[id(node)] = name, stmt
        for child in ast.iter_child_nodes(node):
            visit(child, name, stmt)
    visit(tree, None, None)
    return owner, span, skip


def candidates(node):
    """The mutations of one node: [(description, apply(node) -> None)]."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE:
                new = COMPARE[type(op)]
                out.append((f'{SYMBOL[type(op)]} -> {SYMBOL[new]}',
                            lambda n, i=i, new=new: n.ops.__setitem__(i, new())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in ARITH:
        new = ARITH[type(node.op)]
        out.append((f'{SYMBOL[type(node.op)]} -> {SYMBOL[new]}',
                    lambda n, new=new: setattr(n, 'op', new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f'{SYMBOL[type(node.op)]} -> {SYMBOL[new]}',
                    lambda n, new=new: setattr(n, 'op', new())))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        v = node.value
        if isinstance(v, bool):
            new = not v
        elif isinstance(v, int):
            new = v + 1
        else:
            new = 2 * v if v != 0 else 1.0
        if not (isinstance(v, float) and not (abs(v) < float('inf'))):
            out.append((f'{v!r} -> {new!r}', lambda n, new=new: setattr(n, 'value', new)))
    elif isinstance(node, ast.Call):
        args = node.args
        for i in range(len(args) - 1):
            a, b = args[i], args[i + 1]
            if not any(isinstance(x, (ast.Constant, ast.Starred)) for x in (a, b)) \
                    and ast.dump(a) != ast.dump(b):
                out.append((f'swap arguments {i + 1} and {i + 2} ({ast.unparse(a)}, '
                            f'{ast.unparse(b)})',
                            lambda n, i=i: n.args.__setitem__(slice(i, i + 2),
                                                              [n.args[i + 1], n.args[i]])))
    return out


def unary(node):
    """Dropping a unary minus or a `not`: the operand replaces the operation."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        return 'drop unary -' if isinstance(node.op, ast.USub) else 'drop not'
    return None


class Drop(ast.NodeTransformer):
    """Replace the node with this id (in a deep copy) by its operand."""
    def __init__(self, target):
        self.target = target

    def generic_visit(self, node):
        if getattr(node, '_mutant_id', None) == self.target:
            return node.operand
        return super().generic_visit(node)


def enumerate_mutants(source):
    """Every mutant of sections 1-9: dicts with index, section, line, function, change, source line."""
    tree = ast.parse(source)
    lines = source.splitlines()
    spans = sections(lines)
    owner, span, skip = parents(tree)
    mutants = []
    for k, node in enumerate(ast.walk(tree)):
        node._mutant_id = k
        if id(node) in skip or not hasattr(node, 'lineno'):
            continue
        section = next((s for s, a, b in spans if a <= node.lineno <= b), None)
        if section is None:
            continue
        changes = [(d, None) for d in [unary(node)] if d] + candidates(node)
        for change, apply in changes:
            mutants.append(dict(node=k, section=section, line=node.lineno, span=span[id(node)],
                                function=owner[id(node)] or '<module>', change=change,
                                apply=apply, text=lines[node.lineno - 1].strip()))
    mutants.sort(key=lambda m: (m['line'], m['node'], m['change']))
    for i, m in enumerate(mutants):
        m['index'] = i
    return tree, mutants


def mutated_code(tree, mutant):
    """(the compiled module with one mutation applied, line numbers kept; its source text)."""
    tree = copy.deepcopy(tree)
    if mutant['apply'] is None:
        tree = Drop(mutant['node']).visit(tree)
    else:
        node = next(n for n in ast.walk(tree) if getattr(n, '_mutant_id', None) == mutant['node'])
        mutant['apply'](node)
    ast.fix_missing_locations(tree)
    return compile(tree, str(SOURCE), 'exec'), ast.unparse(tree)


def key(m):
    """How MUTANTS.md names a mutant: section, function and change (stable when lines move)."""
    return f"§{m['section']} {m['function']}: {m['change']} in {m['text']}"


def equivalents():
    """Keys in MUTANTS.md's table of equivalent mutants (before its table of other survivors)."""
    if not EQUIVALENT_FILE.is_file():
        return set()
    text = EQUIVALENT_FILE.read_text().split('## Survivors that are not equivalent')[0]
    return set(re.findall(r'^\| `([^`]+)` \|', text, flags=re.M))


class LineMap:
    """A pytest plugin: the lines of memdiff.py that each test runs.

    Lines run while a test file is collected, or while a test's fixtures are set up (a module's
    fixture is set up once), count for every test of that file: its tests share what they build.
    """
    def __init__(self):
        self.tests, self.shared, self.files, self.seconds, self.current = {}, {}, {}, {}, None

    def trace(self, frame, event, arg):
        if frame.f_code.co_filename != str(SOURCE):
            return None                                 # no line events outside memdiff.py
        self.current.add(frame.f_lineno)
        return self.trace

    def _wrap(self, lines):
        self.current = lines
        sys.settrace(self.trace)
        yield
        sys.settrace(None)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector):
        yield from self._wrap(self.shared.setdefault(str(getattr(collector, 'path', '')), set()))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        yield from self._wrap(self.shared.setdefault(str(item.path), set()))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        self.files[item.nodeid] = f"{item.path}::{item.nodeid.split('::', 1)[1]}"
        t0 = time.perf_counter()
        yield from self._wrap(self.tests.setdefault(item.nodeid, set()))
        self.seconds[item.nodeid] = time.perf_counter() - t0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item):
        yield from self._wrap(self.tests.setdefault(item.nodeid, set()))

    def lines(self):
        """[(pytest address of a test, sorted lines it runs, its file's shared lines included,
        seconds of its call)]."""
        return [(self.files[t], sorted(lines | self.shared.get(self.files[t].split('::')[0], set())),
                 self.seconds.get(t, 0.0)) for t, lines in self.tests.items() if t in self.files]


def run_child(code, tests, trace=None):
    """In a forked child: install the mutated memdiff, run the tests, exit with pytest's code.

    code is (compiled module, source) or None. The source is also written to a folder put first on
    sys.path and PYTHONPATH, so processes a test spawns (a gloo process group) import the mutant too.
    tests are pytest addresses (files or single tests). With trace (a path), the unmutated run
    writes there, as JSON, the lines of memdiff.py each test runs.
    """
    folder = None
    if code is None:
        code = compile(SOURCE.read_text(), str(SOURCE), 'exec')
    else:
        code, text = code
        folder = tempfile.mkdtemp(prefix='mutant-')
        Path(folder, 'memdiff.py').write_text(text)
        Path(folder, 'data').symlink_to(ROOT / 'data')  # the bundled digits, found by __file__
        sys.path.insert(0, folder)
        os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [folder,
                                                                 os.environ.get('PYTHONPATH')]))
    module = types.ModuleType('memdiff')
    module.__file__ = str(SOURCE)
    sys.modules['memdiff'] = module
    exec(code, module.__dict__)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    plugins = [LineMap()] if trace else []
    rc = pytest.main(['-x', '-q', '-p', 'no:cacheprovider', '-m', 'not slow', '--rootdir',
                      str(ROOT), *tests], plugins=plugins)
    if trace:
        Path(trace).write_text(json.dumps(plugins[0].lines()))
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(int(rc))


def start(code, tests, trace=None):
    pid = os.fork()
    if pid == 0:
        try:
            run_child(code, tests, trace)
        finally:
            os._exit(3)
    return pid


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sections', default='1,2,3,4,5,6,7,8,9', help='comma-separated section numbers')
    p.add_argument('--every', type=int, default=1, help='run a seeded sample: 1 mutant in K')
    p.add_argument('--seed', type=int, default=0, help='seed of the sample')
    p.add_argument('--only', default=None, help='comma-separated mutant indices (rerun survivors)')
    p.add_argument('--jobs', type=int, default=1, help='mutants run at once (2 cores: keep 1)')
    p.add_argument('--list', action='store_true', help='list the mutants and stop')
    p.add_argument('--out', default=None, help='write every verdict to this file (tab-separated)')
    args = p.parse_args()

    os.environ.setdefault('OMP_NUM_THREADS', '1')
    os.environ['HYPOTHESIS_PROFILE'] = 'mutate'
    sys.path.insert(0, str(ROOT))
    tree, mutants = enumerate_mutants(SOURCE.read_text())
    wanted = {int(s) for s in args.sections.split(',')}
    chosen = [m for m in mutants if m['section'] in wanted]
    if args.every > 1:
        rng = random.Random(args.seed)
        offset = rng.randrange(args.every)
        chosen = chosen[offset::args.every]
    if args.only:
        only = {int(i) for i in args.only.split(',')}
        chosen = [m for m in mutants if m['index'] in only]
    if args.list:
        for m in chosen:
            print(f"#{m['index']:4d} §{m['section']} L{m['line']:<5d} {m['function']:28s} "
                  f"{m['change']:40s} | {m['text']}")
        print(f'{len(chosen)} of {len(mutants)} mutants')
        return

    # Heavy imports once, in the parent; every child shares them copy-on-write.
    import torch
    import numpy                                        # noqa: F401
    import hypothesis
    torch.set_num_threads(1)
    # The 'ci' profile without shrinking: a failing example kills the mutant, its minimal form
    # would only cost time. Registered before conftest loads it by name.
    hypothesis.settings.register_profile(
        'mutate', max_examples=25, deadline=None, derandomize=True, database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])

    # The unmutated suite must pass; its time per section sets the timeouts, and its traced run
    # records which tests run which lines. A mutant then runs only the tests that run its statement
    # (a test that never runs it cannot see it), or its section's files whole when no traced test
    # does (a constant, run at import, or a line run only in a spawned process), and for a
    # function's defaults (which tests also read through inspect).
    files = {s: [str(ROOT / 'tests' / f) for f in SECTION_TESTS[s]] for s in SECTION_TESTS}
    # Each test file is traced once, and its trace kept in .mutate/ until memdiff.py, the file or
    # conftest.py changes: a rerun of survivors (--only) starts at once.
    seconds, traced = {}, {}
    for f in dict.fromkeys(f for s in sorted({m['section'] for m in chosen}) for f in files[s]):
        digest = hashlib.sha256(b''.join(Path(p).read_bytes() for p in
                                         (SOURCE, f, ROOT / 'tests' / 'conftest.py'))).hexdigest()
        cache = ROOT / '.mutate' / f'{Path(f).stem}-{digest[:16]}.json'
        if not cache.is_file():
            t0 = time.time()
            cache.parent.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(suffix='.json') as trace:
                pid = start(None, [f], trace.name)
                _, status = os.waitpid(pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    sys.exit(f'the unmutated tests of {Path(f).name} fail: fix them first')
                entries = json.load(open(trace.name))
            cache.write_text(json.dumps(dict(seconds=time.time() - t0, tests=entries)))
        record = json.loads(cache.read_text())
        traced[f] = [(test, set(lines), t) for test, lines, t in record['tests']]
        seconds[f] = record['seconds']
        print(f'{Path(f).name} passes unmutated in {seconds[f]:.1f} s (traced)', flush=True)
    budget = {s: 3 * sum(seconds.get(f, 0) for f in files[s]) + 20 for s in files}
    covering = {s: [entry for f in files[s] for entry in traced.get(f, [])] for s in files}

    def tests_of(m):
        """The tests that run m's statement, quickest first (a mutant is killed by its first
        failure: a slow test comes last), or the section's files whole."""
        if m['span'] is None:
            return files[m['section']]
        first, last = m['span']
        tests = [(t, seconds) for t, lines, seconds in covering[m['section']]
                 if any(n in lines for n in range(first, last + 1))]
        return [t for t, _ in sorted(tests, key=lambda e: e[1])] or files[m['section']]

    known_equivalent = equivalents()
    verdicts, running, queue = [], {}, list(chosen)
    t_start = time.time()
    out = open(args.out, 'w') if args.out else None
    while queue or running:
        while queue and len(running) < args.jobs:
            m = queue.pop(0)
            try:
                code = mutated_code(tree, m)
            except (SyntaxError, ValueError, TypeError):
                continue                                # not a valid program: not a mutant
            m['tests'] = tests_of(m)
            running[start(code, m['tests'])] = (m, time.time())
        time.sleep(0.05)
        for pid, (m, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                if time.time() - t0 > budget[m['section']]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    verdict = 'timeout'
                else:
                    continue
            else:
                rc = os.waitstatus_to_exitcode(status)
                verdict = 'survived' if rc in (0, 5) else 'killed'  # 5: no test ran
            del running[pid]
            if verdict == 'survived' and key(m) in known_equivalent:
                verdict = 'equivalent'
            m['verdict'], m['seconds'] = verdict, time.time() - t0
            verdicts.append(m)
            if out:
                out.write(f"{m['index']}\t{verdict}\t{m['seconds']:.1f}\t{key(m)}\n")
                out.flush()
            if verdict == 'survived':
                print(f"SURVIVED #{m['index']} §{m['section']} L{m['line']} {key(m)}", flush=True)
            print(f"[{len(verdicts)}/{len(chosen)}] {verdict:10s} #{m['index']} "
                  f"({m['seconds']:.1f} s, {len(m['tests'])} test(s) or file(s))", file=sys.stderr,
                  flush=True)

    count = {v: sum(m['verdict'] == v for m in verdicts)
             for v in ('killed', 'timeout', 'survived', 'equivalent')}
    caught = count['killed'] + count['timeout']
    scored = caught + count['survived']
    elapsed = time.time() - t_start
    print(f"\n{len(verdicts)} mutants of sections {args.sections}"
          f"{f' (1 in {args.every}, seed {args.seed})' if args.every > 1 else ''} "
          f"in {elapsed / 60:.1f} min: killed {count['killed']}, timeout {count['timeout']}, "
          f"survived {count['survived']}, equivalent {count['equivalent']}")
    if args.every > 1:
        print(f'projected time of the full run: {elapsed * args.every / 60:.0f} min')
    if scored:
        print(f'mutation score: {caught}/{scored} = {100 * caught / scored:.1f}% of the '
              f'non-equivalent mutants')
    for m in verdicts:
        if m['verdict'] == 'survived':
            print(f"  survived #{m['index']} §{m['section']} L{m['line']}: {key(m)}")


if __name__ == '__main__':
    main()
