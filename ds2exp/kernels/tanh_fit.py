"""Eigen's float32 rational fit of tanh: the one home of its coefficients.

tanh(x) ~= x * P(x^2) / Q(x^2) on x clamped to [-CLAMP, CLAMP] (largest absolute error 3.5e-7 over
[-20, 20], measured). The compiled recurrences (kernels/compiled.py) use it because numba's tanh is a
scalar libm call that does not vectorise; the exported GRU graph (models/graph_rnn.py) uses it because
MindSpore 2.8's CPU Tanh kernel is off by up to 1e-4. Both then compute the same function.
"""
CLAMP = 7.90531110763549805
# Coefficients of P and Q in x^2, highest power first (Horner order).
P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
     1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def rational_tanh(x):
    """x * P(x^2) / Q(x^2) for an already clamped x of any array type whose arithmetic keeps its dtype
    with Python floats (MindSpore tensors); the numba kernel spells the same Horner steps in float32."""
    x2 = x * x
    p = x2 * P[0] + P[1]
    for c in P[2:]:
        p = p * x2 + c
    q = x2 * Q[0] + Q[1]
    for c in Q[2:]:
        q = q * x2 + c
    return p * x / q
