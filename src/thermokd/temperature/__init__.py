"""Temperature strategies: each an ``nn.Module`` returning teacher and student temperatures for a batch.

Every strategy is reachable by name: ``thermokd.temperature.build("cist", tau0=4.0)``.
"""
from .base import Temperatures, TemperatureStrategy, build, names, register
from .cist import CIST
from .ctkd import CTKD, InstanceCTKD, grl_lambda
from .dtkd import DTKD
from .dts import DTS, dts_multiplier
from .entropy_target import EntropyTarget, solve_temperature
from .fixed import Fixed
from .lskd import LogitStandardization
from .scheduled import Scheduled

__all__ = ["CIST", "CTKD", "DTKD", "DTS", "EntropyTarget", "Fixed", "InstanceCTKD", "LogitStandardization",
           "Scheduled", "Temperatures", "TemperatureStrategy", "build", "dts_multiplier", "grl_lambda", "names",
           "register", "solve_temperature"]
