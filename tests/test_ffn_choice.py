"""``ffn_kernels_auto``'s policy (`train/ffn_choice.py`) with made-up step times."""

import pytest

from prunepath_jax.train.ffn_choice import PathChooser

SECONDS = {"masked": 2.0, "kernels": 1.0}


def _drive(ch, seconds, sparsity=0.5, compile_s=60.0):
    """Runs steps until the chooser has a choice and no trial is pending; returns the paths run
    and what ``record`` returned for each."""
    ran, returned = [], []
    first = set()
    while True:
        path = ch.next()
        t = seconds[path] + (compile_s if path not in first else 0.0)
        first.add(path)
        ran.append(path)
        returned.append(ch.record(path, t, sparsity))
        if not ch.trying:
            return ran, returned


def test_first_trial_compiles_each_path_untimed_then_picks_the_faster():
    ch = PathChooser(trial_steps=3)
    assert ch.trying and ch.choice is None
    ran, returned = _drive(ch, SECONDS)
    assert ran == ["masked", "kernels"] + ["masked", "kernels"] * 3
    assert returned == [None] * 7 + ["kernels"]  # the compile's 60 s are not counted
    assert ch.choice == "kernels" and ch.next() == "kernels"
    assert ch.medians == SECONDS and ch.chosen_at == 0.5


def test_no_retrial_while_the_sparsity_stays():
    ch = PathChooser(trial_steps=2, retrial_sparsity=0.1)
    _drive(ch, SECONDS)
    for s in (0.45, 0.55, 0.6):
        assert ch.record("kernels", 1.0, s) is None
        assert not ch.trying and ch.next() == "kernels"


def test_retrial_when_the_sparsity_moves_without_compiling_again():
    ch = PathChooser(trial_steps=2, retrial_sparsity=0.1)
    _drive(ch, SECONDS, sparsity=0.9)
    ch.record("kernels", 1.0, 0.75)  # moved by 0.15
    assert ch.trying
    slower_kernels = {"masked": 1.0, "kernels": 3.0}
    ran, returned = _drive(ch, slower_kernels, sparsity=0.75, compile_s=0.0)
    assert ran == ["masked", "kernels"] * 2  # timed steps only: both are compiled
    assert returned[-1] == "masked" and ch.choice == "masked" and ch.chosen_at == 0.75


def test_one_choice_for_every_process():
    """``agree`` (process 0's choice in a multi-host run) overrides this process's times."""
    ch = PathChooser(trial_steps=1, agree=lambda path: "masked")
    _drive(ch, SECONDS)
    assert ch.choice == "masked"


def test_refuses_a_step_it_did_not_ask_for_and_bad_settings():
    ch = PathChooser()
    with pytest.raises(ValueError, match="asked for 'masked'"):
        ch.record("kernels", 1.0, 0.5)
    with pytest.raises(ValueError, match="two or more distinct"):
        PathChooser(("masked", "masked"))
    with pytest.raises(ValueError, match="trial_steps"):
        PathChooser(trial_steps=0)
    with pytest.raises(ValueError, match="retrial_sparsity"):
        PathChooser(retrial_sparsity=float("nan"))
