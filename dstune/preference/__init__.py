"""Preference tuning: the objectives (DPO, IPO, SimPO, ORPO, KTO) and where their reference comes from."""
