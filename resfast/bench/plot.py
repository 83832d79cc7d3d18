"""PNG bar chart of a benchmark run: speedups over eager and torch.compile per
case and mode, and saved-activation ratios."""


def plot(rows, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, vs_eager, vs_compile, memory = [], [], [], []
    for row in rows:
        for mode, r in row["results"].items():
            labels.append(f"{row['config']['case']}\n{mode}")
            vs_eager.append(r["speedup_vs_eager"])
            vs_compile.append(r.get("speedup_vs_compile", float("nan")))
            memory.append(row["saved_ratio"])
    fig, (ax_speed, ax_mem) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(labels)), 8), sharex=True)
    xs = range(len(labels))
    width = 0.4
    ax_speed.bar([x - width / 2 for x in xs], vs_eager, width, label="vs eager")
    ax_speed.bar([x + width / 2 for x in xs], vs_compile, width, label="vs torch.compile")
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_ylabel("speedup (x)")
    ax_speed.legend()
    ax_speed.set_title(f"resfast {env['resfast']} on {env['device']}, {env['dtype']}, torch {env['torch']}, "
                       f"{env['date'][:10]}")
    ax_mem.bar(list(xs), memory, 0.6, color="tab:green")
    ax_mem.axhline(1.0, color="black", linewidth=0.8)
    ax_mem.set_ylabel("saved activations vs eager (x)")
    ax_mem.set_xticks(list(xs))
    ax_mem.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
