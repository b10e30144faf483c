"""Radio pieces of the simulator against hand-computed values from 3GPP TR 38.901 / TR 36.942."""
import numpy as np
import pytest
from scipy import sparse

from simmstnet.sim import measurement as ms
from simmstnet.sim.radio import (ACTIVITY_LEVELS, RadioMap, antenna_gain_db, exponential_fields,
                                 los_probability, pathloss_db, spectral_efficiency)

# Hand computations (TR 38.901 Table 7.4.1-1; h_UT = 1.5 m, h_E = 1 m, c = 299792458 m/s):
# UMa, fc = 2 GHz, h_BS = 25 m: d'_BP = 4 * 24 * 0.5 * 2e9 / c = 320.2 m
#   d2D = 100: d3D = sqrt(100^2 + 23.5^2) = 102.724
#     LOS  PL1 = 28 + 22 log10(102.724) + 20 log10(2) = 28 + 44.2567 + 6.0206 = 78.277
#     NLOS PL' = 13.54 + 39.08 log10(102.724) + 6.0206 = 98.177 (> LOS, so PL = 98.177)
#   d2D = 1000 (> d'_BP): d3D = 1000.276
#     LOS  PL2 = 28 + 40 log10(1000.276) + 6.0206 - 9 log10(320.2^2 + 23.5^2) = 154.025 - 45.119 = 108.906
# UMi, fc = 3.5 GHz, h_BS = 10 m: d'_BP = 4 * 9 * 0.5 * 3.5e9 / c = 210.1 m
#   d2D = 50: d3D = 50.717; LOS PL1 = 32.4 + 21 log10(50.717) + 20 log10(3.5) = 32.4 + 35.808 + 10.881 = 79.090
#   d2D = 200: d3D = 200.181; NLOS PL' = 35.3 log10(200.181) + 22.4 + 21.3 log10(3.5)
#              = 81.240 + 22.4 + 11.589 = 115.229 (LOS PL1 = 91.611 is lower, so PL = 115.229)
HAND = [
    ("UMa", True, 2.0, 100.0, 78.277),
    ("UMa", False, 2.0, 100.0, 98.177),
    ("UMa", True, 2.0, 1000.0, 108.906),
    ("UMi", True, 3.5, 50.0, 79.090),
    ("UMi", False, 3.5, 200.0, 115.229),
]


@pytest.mark.parametrize("scenario,los,fc,d,expected", HAND)
def test_pathloss_matches_hand_computed_tr38901_points(scenario, los, fc, d, expected):
    assert pathloss_db(np.array([d]), scenario, los, fc)[0] == pytest.approx(expected, abs=0.01)


def test_pathloss_increases_with_distance_and_nlos_is_never_below_los():
    d = np.linspace(10, 5000, 400)
    for scenario in ("UMa", "UMi"):
        los = pathloss_db(d, scenario, True, 2.0)
        nlos = pathloss_db(d, scenario, False, 2.0)
        assert np.all(np.diff(los) > 0) and np.all(nlos >= los)


def test_los_probability_hand_values():
    # UMi at 36 m: 18/36 + exp(-1) * (1 - 18/36) = 0.5 + 0.18394
    assert los_probability(np.array([36.0]), "UMi")[0] == pytest.approx(0.68394, abs=1e-5)
    # UMa at 63 m (h_UT <= 13 m, C' = 0): 18/63 + exp(-1) * 45/63 = 0.28571 + 0.26277
    assert los_probability(np.array([63.0]), "UMa")[0] == pytest.approx(0.54849, abs=1e-5)
    assert los_probability(np.array([5.0, 18.0]), "UMa").tolist() == [1.0, 1.0]


def test_antenna_pattern_and_spectral_efficiency():
    g = antenna_gain_db(np.array([0.0, 65.0, 180.0]), 3)
    assert g[0] - g[1] == pytest.approx(12.0) and g[0] - g[2] == pytest.approx(30.0)
    sinr = 10 ** (np.array([-20.0, 0.0, 60.0]) / 10)
    se = spectral_efficiency(sinr, alpha=0.6, se_cap=4.4)
    assert se[0] == 0.0                            # below -10 dB nothing gets through
    assert se[1] == pytest.approx(0.6 * 1.0)        # log2(1 + 1) = 1
    assert se[2] == pytest.approx(4.4)              # capped


def test_shadowing_fields_have_exponential_correlation():
    f = exponential_fields(8, (128, 128), corr_px=6.0, rng=np.random.default_rng(0))
    assert f.std() == pytest.approx(1.0, abs=0.02)
    c = np.mean([np.corrcoef(f[i, :, :-6].ravel(), f[i, :, 6:].ravel())[0, 1] for i in range(8)])
    assert 0.25 < c < 0.5   # exp(-1) = 0.37 at one decorrelation distance
    far = np.mean([np.corrcoef(f[i, :, :-40].ravel(), f[i, :, 40:].ravel())[0, 1] for i in range(8)])
    assert abs(far) < 0.1


def _two_sector_radio(cap_idle: float, cap_full: float) -> RadioMap:
    """Two squares, each served and booked by its own sector; each sector's only interferer is the other."""
    eye = sparse.identity(2, format="csr", dtype=np.float32)
    coupling = sparse.csr_matrix(np.array([[0, 1], [1, 0]], dtype=np.float32))
    cap = np.stack([np.linspace(cap_idle, cap_full, len(ACTIVITY_LEVELS))] * 2)
    return RadioMap(eye, eye, coupling, cap, np.arange(2), {})


def test_net_saturates_at_capacity_and_capacity_falls_with_neighbour_load():
    step = 3600
    to_mb = step / 8e6
    radio = _two_sector_radio(cap_idle=20e6, cap_full=10e6)
    # hour 0: sector 0 overloaded, sector 1 idle -> sector 0 gets its idle-neighbour capacity 20 Mbit/s
    # hour 1: both overloaded -> each gets the full-interference capacity 10 Mbit/s
    # hour 2: both below capacity -> carried = demand
    demand = np.array([[50e6, 0.0], [50e6, 50e6], [3e6, 4e6]]) * to_mb
    carried, info = ms.carried_by_sector(demand.astype(np.float32), radio, step, saturate=True)
    np.testing.assert_allclose(carried[0], [20e6 * to_mb, 0.0], rtol=1e-5)
    np.testing.assert_allclose(carried[1], [10e6 * to_mb, 10e6 * to_mb], rtol=1e-5)
    np.testing.assert_allclose(carried[2], demand[2], rtol=1e-5)
    assert info["congested_sector_steps"] == pytest.approx(3 / 6)
    assert np.all(carried <= demand * (1 + 1e-6))
    # without saturation (Call, SMS) nothing is cut
    free, _ = ms.carried_by_sector(demand.astype(np.float32), radio, step, saturate=False)
    np.testing.assert_allclose(free, demand, rtol=1e-6)


def test_count_noise_dispersion():
    rng = np.random.default_rng(0)
    mu = np.full(200_000, 20.0, np.float32)
    pois = ms.count_noise(mu, "poisson", 10.0, rng)
    nb = ms.count_noise(mu, "negbin", 10.0, rng)
    assert pois.mean() == pytest.approx(20, rel=0.01) and pois.var() == pytest.approx(20, rel=0.03)
    assert nb.mean() == pytest.approx(20, rel=0.01) and nb.var() == pytest.approx(20 + 400 / 10, rel=0.05)
    assert np.all(pois == np.round(pois))
