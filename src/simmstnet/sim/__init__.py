"""Open, fast, randomized simulator of cellular traffic grids (Call, SMS, Net).

Pipeline per scenario (one module each): ``randomization`` draws the parameters from a preset's
ranges; ``geometry`` builds land use, populations and base-station sites; ``radio`` computes
TR 38.901 path loss, shadowing, best servers, SINR and sector capacity; ``demand`` gives the
expected activity per square and step; ``measurement`` serves it through sectors (Net saturates
at capacity), attributes it back to squares by coverage overlap, adds noise, scale and missing
data; ``simulator`` ties them together and saves TrafficGrids; ``realism`` compares simulated
and real statistics. See docs/simulator.md.
"""
from simmstnet.sim.simulator import load_sim_data, sim_data_files, simulate, simulate_scenario, simulate_to_path

__all__ = ["simulate", "simulate_scenario", "simulate_to_path", "load_sim_data", "sim_data_files"]
