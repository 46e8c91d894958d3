"""The two MindSpore 2.8 behaviours that resume works around to stay bitwise: Parameter.set_data detaching
a parameter from its optimizer, and an optimizer's first call flushing denormal state to zero."""
from __future__ import annotations

import numpy as np

def _tiny_training():
    import mindspore as ms

    from ds2exp.models.ctc import ctc_losses
    from ds2exp.models.deepspeech2 import DeepSpeech2
    from ds2exp.training.optim import build_optimizer
    from omegaconf import OmegaConf

    ms.set_seed(0)
    model = DeepSpeech2(conv_channels=2, rnn_layers=1, rnn_hidden=8)
    model.set_train(True)
    opt = build_optimizer(model.trainable_params(), OmegaConf.create(
        {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 161, 64)).astype(np.float32))
    xl, y, yl = (ms.Tensor(np.array(v, np.int32)) for v in ([64, 60], [[1, 2, 3], [4, 5, 0]], [3, 2]))

    def loss(*args):
        logits, out_len = model(args[0], args[1])
        return ctc_losses(logits, out_len, args[2], args[3]).mean()

    grad_fn = ms.value_and_grad(loss, None, opt.parameters)

    def step():
        _, grads = grad_fn(x, xl, y, yl)
        opt(grads)

    return model, opt, step


def _state(model, opt):
    own = {n for n, _ in model.parameters_and_names()}
    return ({n: p.asnumpy().copy() for n, p in model.parameters_and_names()},
            {n: p.asnumpy().copy() for n, p in opt.parameters_and_names() if n not in own})


def test_learning_rate_and_restored_weights_take_effect_after_the_first_step():
    """MindSpore 2.8: after an optimizer has run, Parameter.set_data detaches the parameter from it
    (found while checking resume). The learning rate and restored weights are assigned in place."""
    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.training.optim import set_learning_rate

    model, opt, step = _tiny_training()
    step()
    snapshot, _ = _state(model, opt)
    set_learning_rate(opt, 0.0)
    before, _ = _state(model, opt)
    step()
    after, _ = _state(model, opt)
    assert all(np.array_equal(before[k], after[k]) for k in before if "moving_" not in k)  # lr 0: nothing moves
    set_learning_rate(opt, 1e-2)
    load_state(model, snapshot)  # a rollback after steps
    step()
    moved, _ = _state(model, opt)
    assert not np.array_equal(moved["fc.module.weight"], snapshot["fc.module.weight"])  # still trained


def test_restore_is_bitwise_with_denormal_optimizer_state():
    """Adam's beta1_power is denormal after ~840 steps (beta1=0.9). A resumed optimizer is primed with
    one zero-gradient call before its state is assigned, so its next steps equal the uninterrupted ones."""
    import mindspore as ms

    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.checkpoints.io import prime_optimizer, restore_optimizer

    model, opt, step = _tiny_training()
    step()
    ms.ops.assign(dict(opt.parameters_and_names())["beta1_power"], ms.Tensor(np.float32(1.2e-38)))
    step()
    saved_model, saved_opt = _state(model, opt)
    assert 0 < saved_opt["beta1_power"] < 1.17e-38  # denormal now
    for _ in range(3):
        step()
    final_model, final_opt = _state(model, opt)

    model2, opt2, step2 = _tiny_training()  # "the resumed process"
    prime_optimizer(opt2)
    load_state(model2, saved_model)
    restore_optimizer(opt2, saved_opt)
    for _ in range(3):
        step2()
    got_model, got_opt = _state(model2, opt2)
    for k in final_model:
        np.testing.assert_array_equal(got_model[k], final_model[k], err_msg=k)
    for k in final_opt:
        np.testing.assert_array_equal(got_opt[k], final_opt[k], err_msg=k)
