"""Random kills end in the uninterrupted run's weights and metrics, bit for bit (one seeded round
here; `python -m tests.fault_campaign --rounds 5` runs the full campaign on 1 and 2 ranks)."""

import pytest

from tests import fault_campaign as campaign

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    return campaign.make_world(tmp_path_factory.mktemp("world"))


# 2 ranks here (their kills include one rank's alone); the command runs 1 and 2 ranks, 5 rounds each
@pytest.mark.parametrize("ranks", [2])
def test_three_random_kills_resume_to_identical_weights_and_metrics(overrides, tmp_path, ranks):
    reference = tmp_path / "reference"
    campaign.reference_run(overrides, reference, ranks)
    outcome = campaign.run_round(overrides, reference, tmp_path / "run", ranks, seed=0, kills=3, first=True)
    print(f"\n{ranks} rank(s): {'; '.join(outcome.faults)}; peer exit {outcome.peer_exit_s} s")
    assert outcome.killed == 3
    assert outcome.faults[0].startswith("step@") and int(outcome.faults[0][5]) < campaign.CHECKPOINT_EVERY
    assert outcome.weights_identical
    assert outcome.metrics_identical, outcome.first_difference
    if ranks == 2:  # this seed kills rank 1 alone once: rank 0 and torchrun must not wait for it
        assert outcome.peer_exit_s and max(outcome.peer_exit_s) < 20
