"""FusionBench's Iso-C, Iso-CTS and TSV-M, transcribed for the exactness tests.

From ``tanganke/fusion_bench`` at commit 54c9e8c: ``fusion_bench/method/isotropic_merging/
iso_utils.py`` (``iso_c``, ``iso_cts``; the same arithmetic as the authors'
``danielm1405/iso-merging`` ``src/utils/iso.py``) and ``fusion_bench/method/task_singular_vector/
utils/TSVM_utils.py`` (``compute_and_sum_svd_mem_reduction``). Only device moves, dtype
casts of half precision, prints and timers are removed; every arithmetic operation is kept in
its order. The methods apply ``pretrained + alpha * merged`` (``state_dict_add`` of
``state_dict_mul``), as :func:`merged_model` does.

A transcription, run on the inputs each test builds; ``tests/data/fusionbench_golden.safetensors``
holds FusionBench's own outputs on fixed inputs (``scripts/fusionbench_golden.py`` runs the files
of its wheel unchanged) and ``test_fusionbench_golden.py`` compares the methods with those.
"""

import torch


def iso_c(task_vectors, exclude_keys=None):
    exclude_keys = [] if exclude_keys is None else exclude_keys
    with torch.no_grad():
        new_vector = {}
        for key in task_vectors[0]:
            tvs = [task_vector[key] for task_vector in task_vectors]
            num_tvs = len(tvs)
            new_vector[key] = sum(tvs) / num_tvs
            del tvs
            if len(task_vectors[0][key].shape) == 2 and key not in exclude_keys:
                new_vector[key] *= num_tvs
                U, S, V = torch.linalg.svd(new_vector[key], full_matrices=False)
                S_mean = torch.ones_like(S) * S.mean()
                new_vector[key] = torch.linalg.multi_dot((U, torch.diag(S_mean), V))
    return new_vector


@torch.no_grad()
def iso_cts(task_vectors, common_space_fraction, exclude_keys=None):
    exclude_keys = [] if exclude_keys is None else exclude_keys
    new_vector = {}
    for key in task_vectors[0]:
        shape_ = task_vectors[0][key].shape
        is_2d_matrix = (len(shape_) == 2) and (key not in exclude_keys)
        if not is_2d_matrix:
            for i, task_vector in enumerate(task_vectors):
                vec = task_vector[key]
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)
            continue
        combined_w = sum([task_vector[key] for task_vector in task_vectors])
        common_space_index_s = int(min(shape_) * common_space_fraction)
        _task_specific_total_space_index_s = round(
            (min(shape_) - common_space_index_s) / len(task_vectors)) * len(task_vectors)
        common_space_index_s = min(shape_) - _task_specific_total_space_index_s
        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        common_space_u = u[:, :common_space_index_s]
        common_space_s = s[:common_space_index_s]
        common_space_v = v[:common_space_index_s, :]
        n_dims_per_task = int((min(shape_) - common_space_index_s) / len(task_vectors))
        for i, task_vector in enumerate(task_vectors):
            w = task_vector[key]
            w_ts = w - common_space_u @ common_space_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                combined_space_u = torch.zeros_like(u_ts)
                combined_space_s = torch.zeros_like(s_ts)
                combined_space_v = torch.zeros_like(v_ts)
            combined_space_u[:, i * n_dims_per_task:(i + 1) * n_dims_per_task] = \
                u_ts[:, :n_dims_per_task]
            combined_space_s[i * n_dims_per_task:(i + 1) * n_dims_per_task] = \
                s_ts[:n_dims_per_task]
            combined_space_v[i * n_dims_per_task:(i + 1) * n_dims_per_task, :] = \
                v_ts[:n_dims_per_task, :]
        start = len(task_vectors) * n_dims_per_task
        combined_space_u[:, start:start + common_space_index_s] = common_space_u
        combined_space_s[start:start + common_space_index_s] = common_space_s
        combined_space_v[start:start + common_space_index_s, :] = common_space_v
        u_combined_space_u, _, v_combined_space_u = torch.linalg.svd(
            combined_space_u, full_matrices=False)
        u_combined_space_v, _, v_combined_space_v = torch.linalg.svd(
            combined_space_v, full_matrices=False)
        combined_space_u = u_combined_space_u @ v_combined_space_u
        combined_space_v = u_combined_space_v @ v_combined_space_v
        combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()
        new_vector[key] = torch.linalg.multi_dot(
            (combined_space_u, torch.diag(combined_space_s), combined_space_v))
    return new_vector


def compute_and_sum_svd_mem_reduction(task_vectors, exclude_keys=None):
    if exclude_keys is None:
        exclude_keys = []
    num_tasks = len(task_vectors)
    sv_reduction = 1 / num_tasks
    new_vector = {}
    for key in task_vectors[0]:
        for i, task_vector in enumerate(task_vectors):
            vec = task_vector[key]
            if len(task_vector[key].shape) == 2 and key not in exclude_keys:
                u, s, vh = torch.linalg.svd(vec, full_matrices=False)
                if i == 0:
                    sum_u = torch.zeros_like(u)
                    sum_s = torch.zeros_like(s)
                    sum_vh = torch.zeros_like(vh)
                reduced_index_s = int(s.shape[0] * sv_reduction)
                sum_u[:, i * reduced_index_s:(i + 1) * reduced_index_s] = u[:, :reduced_index_s]
                sum_s[i * reduced_index_s:(i + 1) * reduced_index_s] = s[:reduced_index_s]
                sum_vh[i * reduced_index_s:(i + 1) * reduced_index_s, :] = vh[:reduced_index_s, :]
            else:
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)
        if len(task_vector[key].shape) == 2 and key not in exclude_keys:
            u_u, s_u, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
            u_vh, s_vh, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
            new_vector[key] = torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))
    return new_vector


def merged_model(pretrained, finetuned, merge, alpha=1.0, **options):
    """``pretrained + alpha * merge(task vectors)`` over the floating-point keys."""
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    task_vectors = [{k: sd[k].float() - pretrained[k].float() for k in keys}
                    for sd in finetuned.values()]
    merged = merge(task_vectors, **options)
    return {k: pretrained[k].float() + merged[k] * alpha for k in keys}


# ---- Model Stock: fusion_bench/method/model_stock/model_stock.py ---------------------------
import copy  # noqa: E402
import math  # noqa: E402
from collections import OrderedDict  # noqa: E402

import numpy as np  # noqa: E402

EPS = 1e-8


def compute_angle(state_dict_1, state_dict_2, ref_state_dict, ignore_keys=(), return_cos=False):
    return_dict = OrderedDict()
    with torch.no_grad():
        for key in ref_state_dict:
            if key in ignore_keys:
                continue
            state_dict_1_val = state_dict_1[key]
            state_dict_2_val = state_dict_2[key]
            ref_val = ref_state_dict[key]
            vector1 = (state_dict_1_val - ref_val).clone().detach()
            vector2 = (state_dict_2_val - ref_val).clone().detach()
            vector1 = vector1.float()
            vector2 = vector2.float()
            cosine_val = torch.sum(vector1 * vector2) / (
                math.sqrt(torch.sum(vector1**2) * torch.sum(vector2**2)) + EPS)
            cosine_val = torch.clamp(cosine_val, min=-1.0, max=1.0)
            return_dict[key] = np.rad2deg(torch.acos(cosine_val).detach().cpu().item())
    return return_dict


def compute_ratio(angle_dict, k=2):
    ratio_dict = {}
    for key in angle_dict.keys():
        angle = np.deg2rad(angle_dict[key])
        ratio_dict[key] = k * np.cos(angle) / ((k - 1) * np.cos(angle) + 1 + EPS)
    return ratio_dict


def merge_weights(w1, w2, w0, ratio):
    w12 = {}
    for key in w1.keys():
        w12[key] = (w1[key].clone() + w2[key].clone()) / 2.0
    w_merge = copy.deepcopy(w12)
    for key, r in ratio.items():
        w_merge[key] = w12[key].clone() * r + w0[key].clone() * (1.0 - r)
    return w_merge


def model_stock(pretrained_state_dict, finetuned_state_dicts):
    """``ModelStock.run`` on state dicts (the float tensors)."""
    if len(finetuned_state_dicts) == 2:
        angle_dict = compute_angle(finetuned_state_dicts[0], finetuned_state_dicts[1],
                                   pretrained_state_dict)
        ratio_dict = compute_ratio(angle_dict, k=2)
        return merge_weights(finetuned_state_dicts[0], finetuned_state_dicts[1],
                             pretrained_state_dict, ratio_dict)
    angles_sum, angles_count = {}, {}
    for i in range(len(finetuned_state_dicts)):
        for j in range(i + 1, len(finetuned_state_dicts)):
            angle_dict = compute_angle(finetuned_state_dicts[i], finetuned_state_dicts[j],
                                       pretrained_state_dict)
            for key, angle in angle_dict.items():
                if key not in angles_sum:
                    angles_sum[key] = 0
                    angles_count[key] = 0
                angles_sum[key] += angle
                angles_count[key] += 1
    avg_angle_dict = {key: angles_sum[key] / angles_count[key] for key in angles_sum}
    ratio_dict = compute_ratio(avg_angle_dict, k=len(finetuned_state_dicts))
    avg_finetuned_state_dict = {}
    for key in finetuned_state_dicts[0].keys():
        avg_finetuned_state_dict[key] = torch.zeros_like(finetuned_state_dicts[0][key])
        for state_dict in finetuned_state_dicts:
            avg_finetuned_state_dict[key] += state_dict[key]
        avg_finetuned_state_dict[key] /= len(finetuned_state_dicts)
    merged_state_dict = copy.deepcopy(avg_finetuned_state_dict)
    for key, r in ratio_dict.items():
        merged_state_dict[key] = avg_finetuned_state_dict[key].clone() * r + \
            pretrained_state_dict[key].clone() * (1.0 - r)
    return merged_state_dict


# ---- BitDelta: fusion_bench/method/bitdelta/bitdelta_utils/diff.py (BinaryDiff) ------------
def binary_diff(base, finetune):
    """(mask, coeff) as ``BinaryDiff.__init__`` makes them (unpacked), and the weight its
    forward applies: ``base + coeff * (2 * mask - 1)``."""
    diff = finetune - base
    quantile = diff.float().abs().mean()
    mask = torch.ones_like(diff)
    mask[diff < 0] = 0
    coeff = quantile.clone().detach().to(torch.float32)   # torch.tensor(quantile, float32)
    return base + coeff * (2 * mask - 1)
