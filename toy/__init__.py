"""The 2D preference lab: every minipref objective reshaping a tiny diffusion model on a laptop CPU.

The setup of Diffusion-KTO (paper 001, "Aligning Diffusion Models by Optimizing Human Utility") Sec. 7: a small
MLP diffusion model is pretrained on one Gaussian, then one copy per objective is fine-tuned on samples from a
"desirable" and an "undesirable" Gaussian, and 3500 samples of each show where the objective moved the model.

Read in this order (each file is one concept):

* ``data.py``      the three Gaussians and the exact facts about them (Bayes ceilings, log-density ratios);
* ``schedule.py``  the DDPM noise schedule (T = 1000), DPM-Solver++ and the DDIM timesteps: diffusers' numbers,
                   bit for bit, without importing diffusers;
* ``model.py``     the epsilon-MLP and its timestep embedding;
* ``sampling.py``  sampling, and the stochastic DDIM step with its log-density (for SPO);
* ``flow.py``      the rectified-flow variant (``--flow``): its forward process, velocity loss and Euler sampler;
* ``methods.py``   each objective as a fine-tuning step around the unchanged ``minipref`` loss, with its
                   hyperparameters;
* ``spo.py``       the online method: step-aware preference model, candidate pools, step log-probs;
* ``train.py``     pretraining and the fine-tuning loop;
* ``evaluate.py``  region fractions, energy distance, held-out pairwise implicit accuracy;
* ``plots.py``     the scatter grid and the training curves;
* ``parallel.py``  the methods' independent fine-tunings in worker processes (same numbers in any process);
* ``run.py``       the whole comparison and its output files; ``cli.py`` the command line (``python -m toy``);
* ``bench.py``     the process wall time in calibration units, and each phase (``python -m toy.bench``).
"""

from .methods import METHODS

__all__ = ["METHODS"]
