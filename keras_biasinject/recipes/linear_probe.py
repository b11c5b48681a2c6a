"""The frozen base's control group for classification, fitted as its users fit it: a linear probe.

A head on a frozen encoder is a multinomial logistic regression on the encoder's features. Its users
fit it to convergence on cached features with the regularization chosen on held-out data
(scikit-learn's `LogisticRegressionCV` over standardized features), not with the learning rate and two
epochs that suit the adapters. `fit_linear_probe` does that:

1. the head's input (the pooled, dropout-free features) of every training and validation example, once;
2. features standardized with the training mean and deviation;
3. for each L2 strength in `L2_GRID`, the minimum of
   `sum_i w_i CE(softmax(x_i W + b), y_i) / n + l2/2 |W|^2` (bias not penalized, `w_i` the class
   weights) by Nesterov's accelerated gradient, warm-started from the previous strength;
4. the strength with the lowest validation cross-entropy; its `W, b`, with the standardization folded
   in, become the model's head (`logits`), so the model then scores as any other method's.
"""

import keras
import numpy as np

L2_GRID = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-4)  # strongest first (warm starts); C = 1/(l2 n) of 1e-4 to 10 at n = 1,000
MAX_STEPS = 4000  # per strength; the tolerance below usually stops it first
TOLERANCE = 1e-6  # stop when the gradient's largest entry is below this


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _objective_and_gradient(params, x, onehot, weights, l2):
    """The weighted mean cross-entropy plus `l2/2 |W|^2`, and its gradient; `params` is `[D + 1, K]`
    with the bias in the last row and `x` `[N, D + 1]` ending in a column of ones."""
    p = _softmax(x @ params)  # (N, K)
    n = len(x)
    loss = -(weights * np.log(np.maximum((p * onehot).sum(1), 1e-300))).sum() / n
    grad = x.T @ ((p - onehot) * weights[:, None]) / n  # (D + 1, K)
    penalty = params.copy()
    penalty[-1] = 0.0  # the bias is not penalized
    return loss + 0.5 * l2 * (penalty ** 2).sum(), grad + l2 * penalty


def fit_logistic_regression(features, labels, num_classes, l2, sample_weight=None, start=None):
    """The minimizer `(W [D, K], b [K])` of the L2-penalized, weighted multinomial cross-entropy on
    `features [N, D]` (float64 inside), by Nesterov's accelerated gradient with step `1/L` (L bounds
    the objective's curvature: half the largest eigenvalue of the weighted `x^T x / n`, plus l2) and
    adaptive restarts. `start`: a `[D + 1, K]` warm start. Returns (W, b, the final params, steps)."""
    x = np.concatenate([np.asarray(features, "float64"), np.ones((len(features), 1))], axis=1)  # (N, D + 1)
    labels = np.asarray(labels).reshape(-1).astype(int)
    onehot = np.eye(num_classes)[labels]  # (N, K)
    weights = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, "float64")
    curvature = 0.5 * np.linalg.eigvalsh((x * weights[:, None]).T @ x / len(x)).max() + l2
    step = 1.0 / curvature
    params = np.zeros((x.shape[1], num_classes)) if start is None else np.array(start, "float64")
    previous, momentum, steps = params.copy(), 1.0, 0
    loss, _ = _objective_and_gradient(params, x, onehot, weights, l2)
    for steps in range(1, MAX_STEPS + 1):
        next_momentum = (1 + np.sqrt(1 + 4 * momentum ** 2)) / 2
        look = params + (momentum - 1) / next_momentum * (params - previous)
        _, grad = _objective_and_gradient(look, x, onehot, weights, l2)
        previous, params = params, look - step * grad
        new_loss, new_grad = _objective_and_gradient(params, x, onehot, weights, l2)
        if new_loss > loss:  # adaptive restart (O'Donoghue and Candes): drop the momentum
            next_momentum = 1.0
        momentum, loss = next_momentum, new_loss
        if np.abs(new_grad).max() < TOLERANCE:
            break
    return params[:-1], params[-1], params, steps


def cross_entropy(features, labels, kernel, bias):
    """The mean cross-entropy of `softmax(features @ kernel + bias)` against `labels`."""
    p = _softmax(np.asarray(features, "float64") @ kernel + bias)
    return float(-np.log(np.maximum(p[np.arange(len(p)), np.asarray(labels).astype(int)], 1e-300)).mean())


def head_features(model, ds, split):
    """(features `[N, D]`, labels `[N]`): the input of the model's `logits` layer (inference mode, so no
    dropout) for every example of the tokenized, batched `ds` of (x, y) pairs."""
    reader = keras.Model(model.inputs, model.get_layer("logits").input)
    features, labels = [], []
    for x, y, *_ in ds:
        features.append(np.asarray(reader(x, training=False), "float64"))
        labels.append(np.asarray(y).reshape(-1))
    if not features:
        raise ValueError(f"linear probe: the {split} split holds no examples; the frozen base's head is fitted on the "
                         "training split and its L2 strength chosen on the validation split. Give each examples.")
    return np.concatenate(features), np.concatenate(labels)


def fit_linear_probe(model, train, validation, class_weight=None):
    """Fits the head (`logits` Dense) of the frozen-base classifier `model` as a logistic regression on
    its cached features, the L2 strength chosen on `validation` (the module docstring has the steps).

    `class_weight`: {class id: weight} or None. Returns {"l2": the chosen strength, "val_loss": per
    strength, "steps": per strength}; the model's head holds the fitted weights."""
    head = model.get_layer("logits")
    num_classes = head.units
    x_train, y_train = head_features(model, train, "training")
    x_val, y_val = head_features(model, validation, "validation")
    mean, scale = x_train.mean(0), x_train.std(0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature stays as it is
    standard = (x_train - mean) / scale  # (N, D)
    weights = None if class_weight is None else np.array([class_weight.get(int(c), 1.0) for c in y_train])
    fits, start = [], None
    for l2 in L2_GRID:
        kernel, bias, start, steps = fit_logistic_regression(standard, y_train, num_classes, l2, weights, start)
        kernel, bias = kernel / scale[:, None], bias - (mean / scale) @ kernel  # standardization folded in
        fits.append((cross_entropy(x_val, y_val, kernel, bias), l2, kernel, bias, steps))
    best = min(fits, key=lambda fit: fit[0])
    head.kernel.assign(best[2].astype(head.kernel.dtype))
    head.bias.assign(best[3].astype(head.bias.dtype))
    return {"l2": best[1], "val_loss": [round(f[0], 6) for f in fits], "steps": [f[4] for f in fits]}
