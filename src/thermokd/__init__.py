"""thermokd: knowledge distillation with the temperature done right.

    import thermokd as tk
    loss_fn = tk.DistillationLoss(temperature=tk.temperature.CIST(tau0=4.0),
                                  weighting=tk.weighting.ConfidenceDifficulty())
    out = loss_fn(student_logits, teacher_logits, labels, progress=tk.Progress(step=s, total_steps=S))
    out.loss.backward(); optimizer.step(); loss_fn.observe(out)
"""
from . import functional, temperature, weighting
from .errors import ConfigError, ThermoKDError
from .loss import DistillationLoss, LossOutput
from .methods import build_loss, method_names
from .progress import Progress

__version__ = "0.1.0"
__all__ = ["ConfigError", "DistillationLoss", "LossOutput", "Progress", "ThermoKDError", "build_loss",
           "functional", "method_names", "temperature", "weighting", "__version__"]
