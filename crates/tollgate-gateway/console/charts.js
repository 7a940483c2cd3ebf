// Hand-written SVG charts, built node by node with createElementNS (no markup strings).
//
// Money stays a string: a value is converted to a Number only to size its bar. Every label and
// tooltip shows the API's decimal string as sent, and the scale's top line is labelled with the
// API's own total for the tallest bar, so no figure on the chart was computed by the browser.

const SVG_NS = "http://www.w3.org/2000/svg";

/** Distinct, colour-blind-safe colours (Okabe–Ito, then a few more); one per series. */
const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#332288", "#999933", "#882255"];

export function colorFor(index) {
  return PALETTE[index % PALETTE.length];
}

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) {
    node.setAttribute(name, String(value));
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** "2026-12-04" → "12-04"; any other category as it is. */
function shortCategory(category) {
  return /^\d{4}-\d{2}-\d{2}$/.test(category) ? category.slice(5) : category;
}

/** Legend items laid out in rows under the title; returns the group and its height. */
function legend(series, width, top) {
  const group = svg("g", { class: "chart-legend", "data-test": "chart-legend" });
  let x = 0;
  let y = top;
  const rowHeight = 18;
  series.forEach((name, index) => {
    const itemWidth = 22 + name.length * 7 + 16;
    if (x > 0 && x + itemWidth > width) {
      x = 0;
      y += rowHeight;
    }
    const item = svg("g", { "data-test": "legend-item", "data-series": name, transform: `translate(${x},${y})` });
    item.append(svg("rect", { x: 0, y: -10, width: 12, height: 12, rx: 2, fill: colorFor(index) }));
    item.append(svg("text", { x: 18, y: 0, class: "chart-legend-label" }, name));
    group.append(item);
    x += itemWidth;
  });
  return { group, height: series.length ? y - top + rowHeight : 0 };
}

/**
 * A stacked bar chart: one bar per category (e.g. a day), one coloured segment per series (e.g. a
 * model).
 *
 *   title       shown on top, and the start of the accessible label
 *   categories  the bars, in order (days with no data get an empty slot)
 *   series      the stack's parts, in order; the legend lists them with their colours
 *   segments    [{category, series, value, detail}] with value the API's decimal string
 *   totals      {category: the API's decimal string for the whole bar}
 *   valueLabel, categoryLabel   the axes' titles
 */
export function stackedBarChart({ title, categories, series, segments, totals, valueLabel, categoryLabel, width = 760, height = 300 }) {
  const root = svg("svg", {
    class: "chart",
    "data-test": "usage-chart",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    preserveAspectRatio: "xMinYMin meet",
  });
  root.append(svg("title", {}, title));
  root.append(svg("text", { x: 0, y: 16, class: "chart-title" }, title));

  const margin = { left: 84, right: 12, bottom: 44 };
  const { group: legendGroup, height: legendHeight } = legend(series, width - margin.left, 38);
  legendGroup.setAttribute("transform", `translate(${margin.left},0)`);
  root.append(legendGroup);
  margin.top = 38 + legendHeight + 8;
  const plotWidth = width - margin.left - margin.right;
  const plotHeight = height - margin.top - margin.bottom;

  // The scale: the tallest bar's total (a Number for sizing only; its label is the API's string).
  let tallest = null;
  for (const category of categories) {
    const total = totals[category];
    if (total !== undefined && (tallest === null || Number(total) > Number(totals[tallest]))) {
      tallest = category;
    }
  }
  const scaleMax = tallest === null ? 0 : Number(totals[tallest]);

  const plot = svg("g", { transform: `translate(${margin.left},${margin.top})` });
  root.append(plot);
  plot.append(svg("line", { x1: 0, y1: plotHeight, x2: plotWidth, y2: plotHeight, class: "chart-axis" }));
  plot.append(svg("line", { x1: 0, y1: 0, x2: 0, y2: plotHeight, class: "chart-axis" }));
  plot.append(svg("text", { x: -6, y: plotHeight + 4, class: "chart-tick chart-tick-y" }, "0"));
  if (scaleMax > 0) {
    plot.append(svg("line", { x1: 0, y1: 0, x2: plotWidth, y2: 0, class: "chart-grid" }));
    plot.append(svg("text", { x: -6, y: 4, class: "chart-tick chart-tick-y", "data-test": "chart-max" }, totals[tallest]));
  }
  const yTitle = svg("text", { class: "chart-axis-title", transform: `translate(${-margin.left + 12},${plotHeight / 2}) rotate(-90)` }, valueLabel);
  plot.append(yTitle);
  plot.append(svg("text", { x: plotWidth / 2, y: plotHeight + 38, class: "chart-axis-title chart-axis-title-x" }, categoryLabel));

  const slot = categories.length ? plotWidth / categories.length : plotWidth;
  const barWidth = Math.max(2, Math.min(36, slot * 0.7));
  const labelEvery = Math.max(1, Math.ceil(categories.length / 12));
  const byCategory = new Map(categories.map((category) => [category, []]));
  for (const segment of segments) {
    byCategory.get(segment.category)?.push(segment);
  }

  let segmentCount = 0;
  categories.forEach((category, index) => {
    const x = index * slot + (slot - barWidth) / 2;
    const bar = svg("g", { class: "chart-bar", "data-category": category });
    const parts = byCategory.get(category).sort((a, b) => series.indexOf(a.series) - series.indexOf(b.series));
    let top = plotHeight;
    for (const part of parts) {
      const size = scaleMax > 0 ? (Number(part.value) / scaleMax) * plotHeight : 0;
      if (!(size > 0)) {
        continue;
      }
      top -= size;
      const rect = svg("rect", {
        x,
        y: top,
        width: barWidth,
        height: Math.max(size, 0.5),
        fill: colorFor(series.indexOf(part.series)),
        class: "chart-segment",
        "data-series": part.series,
        "data-value": part.value,
      });
      rect.append(svg("title", {}, `${category} · ${part.series}: ${part.value}${part.detail ? ` (${part.detail})` : ""}`));
      bar.append(rect);
      segmentCount += 1;
    }
    if (totals[category] !== undefined) {
      bar.append(svg("title", {}, `${category}: ${totals[category]} in all`));
    }
    plot.append(bar);
    if (index % labelEvery === 0) {
      plot.append(svg("text", { x: x + barWidth / 2, y: plotHeight + 16, class: "chart-tick chart-tick-x" }, shortCategory(category)));
    }
  });

  if (segmentCount === 0) {
    const empty = segments.length === 0 ? "No usage in this period" : "Usage in this period, all of it at no cost";
    plot.append(svg("text", { x: plotWidth / 2, y: plotHeight / 2, class: "chart-empty" }, empty));
  }
  const summary = tallest === null
    ? `${title}: no usage in this period.`
    : `${title}: ${categories.length} bars (${categoryLabel}); series ${series.join(", ")}; the highest, ${tallest}, totals ${totals[tallest]}.`;
  root.setAttribute("aria-label", summary);
  return root;
}
