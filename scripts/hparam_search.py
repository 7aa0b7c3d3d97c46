"""Grid or random search over alpha, T, p and gamma, scored on the validation split only.

    python scripts/hparam_search.py --flagfile_base=flags/paper.cfg --method=kd_ig \
        --alphas=0.1,0.25,0.5,0.75 --temperatures=2,4,8 --output_dir=results/hparam_search
    python scripts/hparam_search.py --search=random --num_trials=20 \
        --alphas=0.01:0.9 --temperatures=1:20:log --ps=0.1:0.9

Grid search takes comma lists; random search also takes ranges ``lo:hi`` (uniform) or
``lo:hi:log`` (log-uniform), and samples reproducibly from ``--search_seed``. An empty
option keeps the base flagfile's value. Each trial is a distillation run in this process, in
``<output_dir>/trials/trial<k>`` (``trial<k>/seed<s>`` with several ``--seeds``, ranked on
their mean), its output in the trial's ``log.txt``; finished trials are skipped, failed ones
retried.

Trials are ranked on ``--val_split`` (default ``train[45000:]``); a split named ``test`` is
refused unless ``--final_report``. Writes ``trials.json`` / ``trials.md`` (ranked),
``runs.csv`` / ``runs.json`` and ``best.cfg``: a self-contained distill flagfile with every
setting of the winning trial but its seed (use it as the ablation's ``--flagfile_base``).
"""
import os


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import campaigns, cli, experiments
from kdig_tf import logs
from kdig_tf.errors import FlagError

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_string("flagfile_base", "flags/paper.cfg",
                    "Base flagfile of every run, as distill.py's --flagfile ('' = none).")
flags.DEFINE_string("method", "kd_ig", "distill --method to tune (or <method>_shuffled).")
flags.DEFINE_enum("search", "grid", ["grid", "random"], "Search strategy.")
flags.DEFINE_integer("num_trials", 20, "Random search: number of trials.")
flags.DEFINE_integer("search_seed", 0, "Random search: sampling seed.")
flags.DEFINE_string("alphas", "0.1,0.25,0.5,0.75,0.9", "alpha values (or lo:hi[:log] for random); '' = not searched.")
flags.DEFINE_string("temperatures", "1,2,4,8", "Temperature values (or lo:hi[:log]); '' = not searched.")
flags.DEFINE_string("ps", "", "p values (or lo:hi[:log]); '' = not searched.")
flags.DEFINE_string("gammas", "", "gamma values (or lo:hi[:log]); '' = not searched.")
flags.DEFINE_list("seeds", ["0"], "Training seeds per trial (scores are averaged).")
flags.DEFINE_string("val_split", "train[45000:]", "Split the trials are scored on.")
flags.DEFINE_string("output_dir", "results/hparam_search", "Search directory (trials, tables, best.cfg).")
flags.DEFINE_string("extra_flags", "", "Flags passed to every run, e.g. \"--epochs=5\".")
flags.DEFINE_bool("final_report", False, "Allow splits named 'test' (never for tuning in a real study).")
flags.DEFINE_bool("dry_run", False, "Print the distill.py commands of unfinished trials; launch nothing.")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {argv[1:]}")
    from kdig_tf import cli

    cli.run(_search)


def search_space():
    """{distill flag: parsed values} for every non-empty search option."""
    space = {}
    for option, flag in campaigns.SEARCH_FLAGS.items():
        text = FLAGS[option].value
        if text and text.strip():
            space[flag] = campaigns.parse_search_values(flag, text)
    return space


def _search():
    # Refuse before anything else happens, including reading the base flagfile.
    experiments.check_selection_split(FLAGS.val_split, FLAGS.final_report, "val_split")
    seeds = experiments.resolve_seeds(FLAGS.seeds, 1)
    report = campaigns.run_hparam_search(
        FLAGS.output_dir, FLAGS.flagfile_base or None, search_space(), method=FLAGS.method, search=FLAGS.search,
        num_trials=FLAGS.num_trials, search_seed=FLAGS.search_seed, seeds=seeds, val_split=FLAGS.val_split,
        extra_flags=FLAGS.extra_flags, final_report=FLAGS.final_report, dry_run=FLAGS.dry_run)
    if report is not None:
        best = report.get("best")
        if best:
            print(f"best: trial {best['trial']} {best['params']} val accuracy {best['mean']:.2f} "
                  f"(n={best['n']}) -> {best['flagfile']}")
        print(f"written: {os.path.join(FLAGS.output_dir, 'trials.md')}")


if __name__ == "__main__":
    cli.main(main)
