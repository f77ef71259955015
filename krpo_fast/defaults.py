"""Names and default values shared by the ops, the reference code, the trainer's
configuration and the TRL / verl integrations, defined once here."""

# Advantage estimators: the KRPO Kalman filter and the GRPO baselines.
ADVANTAGE_MODES = ("kalman", "grpo", "dr_grpo", "batch_std")
# How per-token losses become one number (see ``krpo_fast.policy_loss``).
LOSS_AGGREGATIONS = (
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

ADV_MODE = "kalman"
LOSS_AGG = "seq-mean-token-mean"

# The paper's Kalman filter: process variance Q, measurement variance R, x_0, P_0.
PROCESS_VAR = 1e-5
MEAS_VAR = 1e-2
INIT_MEAN = 0.0
INIT_VAR = 1.0
# Added to sqrt(P) or to the std before dividing.
ADV_EPS = 1e-8

# Clipped surrogate and k3 KL.
EPS_LOW = 0.2
EPS_HIGH = 0.2
BETA = 0.01

TEMPERATURE = 1.0
# Tokens per chunk of the LM-head ops (about chunk_size * V logits at a time).
CHUNK_SIZE = 1024

# The loss family beyond the paper's loss (docs/loss_family.md); these defaults are the
# paper's loss.
RATIO_LEVELS = ("token", "sequence")
LOSS_TYPES = ("clip", "cispo", "sapo")
KL_ESTIMATORS = ("k3", "k1", "k2", "low_var_kl")
RATIO_LEVEL = "token"
LOSS_TYPE = "clip"
# SAPO's gate temperatures for positive and for other advantages.
TAU_POS = 1.0
TAU_NEG = 1.05
KL_ESTIMATOR = "k3"
ENTROPY_COEF = 0.0
