// rlmq view: renders a trajectory (docs/trajectory.md) as it grows. No libraries, no network
// beyond the server that sent the page (and none at all for an --html file).
(function () {
  "use strict";

  const CONFIG = JSON.parse(document.getElementById("rlmq-data").textContent);
  const PAGE = 100; // sub-call rows built per list and per "show more": 10,000 rows never sit in the DOM
  const PREVIEW = 160; // characters of prompt and answer shown on a collapsed row

  // ------------------------------------------------------------------ helpers
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = v;
        else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const kid of kids) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }
  const num = (x) => (typeof x === "number" && isFinite(x) ? x : 0);
  function fmtTok(n) {
    n = num(n);
    if (n < 1000) return String(n);
    if (n < 1e6) return (n / 1e3).toFixed(n < 1e4 ? 1 : 0) + "k";
    return (n / 1e6).toFixed(2) + "M";
  }
  function fmtCost(c) {
    c = num(c);
    if (c === 0) return "$0";
    return "$" + (c < 1 ? c.toFixed(4) : c.toFixed(2));
  }
  function fmtMs(ms) {
    ms = num(ms);
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(ms < 1e4 ? 2 : 1) + " s";
  }
  const oneLine = (s, n) => {
    s = String(s === null || s === undefined ? "" : s).replace(/\s+/g, " ").trim();
    return s.length > n ? s.slice(0, n) + "…" : s;
  };
  function errText(e) {
    if (e === null || e === undefined) return "";
    if (typeof e === "string") return e;
    const code = e.code ? e.code + ": " : "";
    return code + (e.message !== undefined ? e.message : JSON.stringify(e));
  }
  function usageOf(e) {
    const u = e && e.usage;
    if (!u || typeof u !== "object") return { i: 0, o: 0 };
    return { i: num(u.input_tokens), o: num(u.output_tokens) };
  }
  // Text with every occurrence of the search query marked.
  function marked(text, query) {
    text = String(text === null || text === undefined ? "" : text);
    if (!query) return document.createTextNode(text);
    const frag = document.createDocumentFragment();
    const low = text.toLowerCase();
    let at = 0;
    for (;;) {
      const hit = low.indexOf(query, at);
      if (hit < 0) break;
      frag.append(text.slice(at, hit), h("mark", { text: text.slice(hit, hit + query.length) }));
      at = hit + query.length;
    }
    frag.append(text.slice(at));
    return frag;
  }
  function wholePrompt(s) {
    const head = String(s.prompt === null || s.prompt === undefined ? "" : s.prompt);
    if (s.prompt_tail === null || s.prompt_tail === undefined) return head;
    const cut = num(s.prompt_chars) - head.length - String(s.prompt_tail).length;
    return head + "\n… [" + (cut > 0 ? cut + " characters not recorded" : "cut") + "] …\n" + s.prompt_tail;
  }

  // ------------------------------------------------------------------ model
  // levels: "0" is the root loop, "0.1" its first child run, and so on (the events' `level`).
  let M;
  function reset() {
    M = {
      schema: 1,
      ask: 0,
      levels: new Map(),
      runStart: null,
      runEnd: null,
      events: 0,
      bad: 0, // lines that were not a JSON object
      subs: 0,
      unplaced: [], // child levels whose parent block is unknown (a file cut before child_start)
      v1AtDepth: [], // schema 1 had no level ids: the level open at each depth
      v1Pending: new Map(), // schema 1: children started before their block's exec event arrived
      dirty: new Set(),
    };
    document.getElementById("main").replaceChildren(h("p", { class: "muted", id: "empty", text: "No events yet." }));
  }
  const open = new Set(); // keys of expanded rows and lists: survives re-renders
  const closed = new Set(); // lists closed by hand during the current search
  const pages = new Map(); // list key -> rows shown
  let query = "";

  function level(id) {
    let L = M.levels.get(id);
    if (!L) {
      L = { id, depth: id.split(".").length - 1, parent: null, start: null, end: null, final: null,
            iters: new Map(), notes: [], el: null, headEl: null, itersEl: null, stripEl: null, placed: false };
      M.levels.set(id, L);
      M.dirty.add(L);
    }
    return L;
  }
  function iter(L, n) {
    n = num(n) + (M.ask > 1 ? (M.ask - 1) * 100000 : 0); // a conversation's asks each count from 1

    let it = L.iters.get(n);
    if (!it) {
      it = { n, ask: M.ask, level: L, calls: [], blocks: new Map(), notes: [], el: null, t0: Infinity, t1: -Infinity };
      L.iters.set(n, it);
    }
    M.dirty.add(it);
    M.dirty.add(L);
    return it;
  }
  function block(it, b) {
    b = num(b);
    let B = it.blocks.get(b);
    if (!B) {
      B = { index: b, code: null, start: null, end: null, subs: [], children: [] };
      it.blocks.set(b, B);
    }
    return B;
  }
  function levelOf(e) {
    if (e.level !== undefined && e.level !== null) return String(e.level);
    if (typeof e.depth === "number") return M.v1AtDepth[e.depth] || "0";
    return "0";
  }
  function stamp(it, t0, t1) {
    if (typeof t1 !== "number") return;
    it.t0 = Math.max(0, Math.min(it.t0, typeof t0 === "number" ? t0 : t1));
    it.t1 = Math.max(it.t1, t1);
  }
  function attachChild(parent, iteration, blockIndex, child) {
    const B = block(iter(parent, iteration), blockIndex);
    if (!B.children.includes(child.id)) B.children.push(child.id);
    child.placed = true;
  }

  function ingest(e) {
    if (!e || typeof e !== "object") return;
    M.events++;
    const kind = e.event;
    if (kind === "run_start") {
      M.runStart = e;
      M.schema = num(e.schema) || 1;
      const L = level(levelOf(e));
      L.start = e;
      M.v1AtDepth[0] = L.id;
      return;
    }
    if (kind === "ask") M.ask = num(e.ask);
    if (kind === "run_end") { M.runEnd = e; M.dirty.add(level("0")); return; }
    if (kind === "child_start") {
      let id, parentId;
      if (e.level !== undefined && e.level !== null && e.parent !== undefined) {
        id = String(e.level); parentId = String(e.parent);
      } else { // schema 1: depth only; the child belongs to the block about to be reported
        const d = num(e.depth);
        parentId = M.v1AtDepth[d - 1] || "0";
        const P = level(parentId);
        P.v1Children = (P.v1Children || 0) + 1;
        id = parentId + "." + P.v1Children;
        M.v1AtDepth[d] = id;
      }
      const C = level(id);
      C.start = e; C.parent = parentId; C.depth = num(e.depth) || C.depth;
      if (e.iteration !== undefined && e.block !== undefined) attachChild(level(parentId), e.iteration, e.block, C);
      else {
        const list = M.v1Pending.get(parentId) || [];
        list.push(id);
        M.v1Pending.set(parentId, list);
      }
      return;
    }
    const L = level(levelOf(e));
    if (kind === "child_end") { L.end = e; M.dirty.add(L); return; }
    if (kind === "final" && e.iteration === undefined) { L.final = e; M.dirty.add(L); return; }
    if (e.iteration === undefined || e.iteration === null) { L.notes.push(e); M.dirty.add(L); return; }
    const it = iter(L, e.iteration);
    // Times relative to run_start, whatever clock the writer's t began at.
    const t = typeof e.t === "number" ? e.t - (M.runStart && typeof M.runStart.t === "number" ? M.runStart.t : 0) : undefined;
    if (kind === "model_call") {
      it.calls.push(e);
      stamp(it, t !== undefined ? t - num(e.latency_ms) / 1000 : t, t);
    } else if (kind === "exec_start") {
      const B = block(it, e.block);
      B.start = e; if (e.code !== undefined) B.code = e.code;
      stamp(it, t, t);
    } else if (kind === "sub_call") {
      const B = block(it, e.block);
      // Records arrive in order of completion; keep them in order of issue (seq).
      let at = B.subs.length;
      while (at > 0 && num(B.subs[at - 1].seq) > num(e.seq)) at--;
      B.subs.splice(at, 0, e);
      M.subs++;
    } else if (kind === "exec_end" || kind === "exec") {
      const B = block(it, e.block);
      B.end = e; if (e.code !== undefined && e.code !== null) B.code = e.code;
      stamp(it, t !== undefined ? t - num(e.elapsed_ms) / 1000 : t, t);
      const pending = M.v1Pending.get(L.id);
      if (kind === "exec" && pending) {
        for (const id of pending) attachChild(L, e.iteration, e.block, level(id));
        M.v1Pending.delete(L.id);
      }
    } else if (kind === "final" && e.iteration !== undefined) {
      L.final = e; it.notes.push(e); M.dirty.add(L);
    } else {
      it.notes.push(e);
      stamp(it, t, t);
    }
  }

  // ------------------------------------------------------------------ totals
  function subTotals(B) {
    let i = 0, o = 0, c = 0, failed = 0, cached = 0, end = 0;
    for (const s of B.subs) {
      const u = usageOf(s);
      i += u.i; o += u.o; c += num(s.cost_usd);
      if (s.error) failed++;
      if (s.cached) cached++;
      end = Math.max(end, num(s.started_ms) + num(s.latency_ms));
    }
    return { i, o, c, failed, cached, end };
  }
  function iterTotals(it) {
    const T = { i: 0, o: 0, c: 0, subs: 0, model: { i: 0, o: 0, c: 0 }, sub: { i: 0, o: 0, c: 0 }, child: { i: 0, o: 0, c: 0 } };
    for (const call of it.calls) {
      const u = usageOf(call);
      T.model.i += u.i; T.model.o += u.o; T.model.c += num(call.cost_usd);
    }
    for (const B of it.blocks.values()) {
      const s = subTotals(B);
      T.sub.i += s.i; T.sub.o += s.o; T.sub.c += s.c; T.subs += B.subs.length;
      for (const id of B.children) {
        const C = M.levels.get(id);
        if (!C) continue;
        const ct = levelTotals(C);
        T.child.i += ct.i; T.child.o += ct.o; T.child.c += ct.c; T.subs += ct.subs;
      }
    }
    for (const part of [T.model, T.sub, T.child]) { T.i += part.i; T.o += part.o; T.c += part.c; }
    return T;
  }
  function levelTotals(L) {
    const T = { i: 0, o: 0, c: 0, subs: 0, calls: 0 };
    for (const it of L.iters.values()) {
      const t = iterTotals(it);
      T.i += t.i; T.o += t.o; T.c += t.c; T.subs += t.subs; T.calls += it.calls.length;
    }
    return T;
  }

  // ------------------------------------------------------------------ sub-calls
  function hay(s) {
    if (s._hay === undefined) {
      s._hay = [s.prompt, s.prompt_tail, s.text, errText(s.error), s.model].filter((x) => x).join("\n").toLowerCase();
    }
    return s._hay;
  }
  const matches = (s) => !query || hay(s).includes(query);
  const subKey = (L, it, B, s, i) => "s|" + L.id + "|" + it.n + "|" + B.index + "|" + (s.seq !== undefined ? s.seq : "i" + i);

  function subBody(s) {
    const body = h("div", { class: "sub-body" });
    body.append(h("h4", { text: "prompt" + (s.prompt_tail !== null && s.prompt_tail !== undefined ? " (head and tail of " + num(s.prompt_chars) + " characters)" : "") }));
    body.append(h("pre", { class: "prompt" }, marked(wholePrompt(s), query)));
    if (s.error) body.append(h("h4", { text: "error" }), h("div", { class: "error" }, marked(errText(s.error), query)));
    if (s.text !== null && s.text !== undefined) body.append(h("h4", { text: "answer" }), h("pre", { class: "answer-text" }, marked(s.text, query)));
    const u = usageOf(s);
    const facts = [s.model && "model " + s.model, "depth " + num(s.depth), fmtTok(u.i) + " in / " + fmtTok(u.o) + " out",
      s.cost_usd ? fmtCost(s.cost_usd) : null, "started " + fmtMs(s.started_ms), "took " + fmtMs(s.latency_ms),
      s.cached ? "cached" : null, s.replayed ? "replayed" : null, s.diverged ? "diverged" : null,
      s.prompt_sha256 ? "sha256 " + String(s.prompt_sha256).slice(0, 12) + "…" : null].filter((x) => x);
    body.append(h("div", { class: "note", text: facts.join(" · ") }));
    return body;
  }
  function subRow(key, s) {
    const u = usageOf(s);
    const row = h("div", { class: "sub" + (s.error ? " failed" : ""), "data-key": key, "data-seq": s.seq });
    const answer = s.error ? "✗ " + errText(s.error) : s.text;
    const line = h("div", { class: "sub-line", title: "show the whole prompt and answer" },
      h("span", { class: "seq", text: "#" + (s.seq !== undefined ? s.seq : "?") }),
      h("span", { class: "meta", text: (s.model || "") + " · " + fmtTok(u.i) + "/" + fmtTok(u.o) + " tok · " + fmtMs(s.latency_ms) }),
      s.cached ? h("span", { class: "badge cached", text: "cached" }) : null,
      s.replayed ? h("span", { class: "badge replayed", text: "replayed" }) : null,
      s.diverged ? h("span", { class: "badge err", text: "diverged" }) : null,
      h("span", { class: "preview" }, marked(oneLine(s.prompt, PREVIEW / 2), query), h("span", { class: "arrow", text: "  →  " }),
        marked(oneLine(answer, PREVIEW), query)));
    row.append(line);
    if (open.has(key)) row.append(subBody(s)); // built only for rows someone opened
    line.addEventListener("click", () => {
      if (open.has(key)) { open.delete(key); const b = row.querySelector(".sub-body"); if (b) b.remove(); }
      else { open.add(key); row.append(subBody(s)); }
    });
    return row;
  }

  function waterfall(B) {
    const subs = B.subs;
    const end = Math.max(1, subTotals(B).end);
    const n = subs.length;
    const bar = n <= 20 ? 12 : n <= 80 ? 6 : n <= 400 ? 2 : 1;
    const height = Math.min(Math.max(n * (bar + (bar > 2 ? 2 : 0)) + 22, 40), 420);
    const canvas = h("canvas", { class: "waterfall", height, "data-bars": n, "data-span-ms": Math.round(end),
      title: "each sub-call of this block: from when it started to when it answered (since the block began)" });
    const draw = () => {
      const width = canvas.clientWidth || 800;
      canvas.width = width * (window.devicePixelRatio || 1);
      canvas.height = height * (window.devicePixelRatio || 1);
      const g = canvas.getContext("2d");
      if (!g) return;
      g.scale(window.devicePixelRatio || 1, window.devicePixelRatio || 1);
      const left = 40, right = 10, top = 4, plot = width - left - right;
      const rowH = (height - 22 - top) / Math.max(n, 1);
      subs.forEach((s, i) => {
        const x = left + (num(s.started_ms) / end) * plot;
        const w = Math.max(1, (num(s.latency_ms) / end) * plot);
        g.fillStyle = s.error ? "#c43a31" : s.replayed ? "#7a4fd0" : s.cached ? "#8a94a6" : "#2f6fdf";
        g.globalAlpha = query && !matches(s) ? 0.25 : 1;
        g.fillRect(x, top + i * rowH, w, Math.max(1, rowH - (rowH > 3 ? 1.5 : 0)));
        if (rowH >= 11) {
          g.globalAlpha = 1; g.fillStyle = "#667085"; g.font = "10px sans-serif";
          g.fillText("#" + (s.seq !== undefined ? s.seq : i), 4, top + i * rowH + rowH - 3);
        }
      });
      g.globalAlpha = 1; g.fillStyle = "#667085"; g.font = "11px sans-serif";
      g.fillText("0", left, height - 6);
      const label = fmtMs(end);
      g.fillText(label, width - right - g.measureText(label).width, height - 6);
      g.fillRect(left, height - 18, plot, 1);
    };
    requestAnimationFrame(draw); // after layout, when the canvas has its width
    canvas.addEventListener("mousemove", (ev) => {
      const r = canvas.getBoundingClientRect();
      const i = Math.floor(((ev.clientY - r.top - 4) / (height - 26)) * n);
      const s = subs[i];
      if (s) canvas.title = "#" + s.seq + " started " + fmtMs(s.started_ms) + ", took " + fmtMs(s.latency_ms) + (s.error ? ", failed: " + errText(s.error) : "");
    });
    return canvas;
  }

  function subList(L, it, B) {
    const listKey = "l|" + L.id + "|" + it.n + "|" + B.index;
    const t = subTotals(B);
    const wrap = h("div", { class: "subs", "data-list": listKey });
    const shown = query ? B.subs.filter(matches) : B.subs;
    // While searching, lists with matches open by themselves unless closed by hand.
    const isOpen = query ? shown.length > 0 && !closed.has(listKey) : open.has(listKey);
    const label = (isOpen ? "▾ " : "▸ ") + B.subs.length + " sub-call" + (B.subs.length === 1 ? "" : "s") +
      (query ? " (" + shown.length + " match" + (shown.length === 1 ? "" : "es") + ")" : "") +
      " · " + fmtTok(t.i) + " in / " + fmtTok(t.o) + " out" + (t.c ? " · " + fmtCost(t.c) : "") +
      (t.failed ? " · " + t.failed + " failed" : "") + (t.cached ? " · " + t.cached + " cached" : "") +
      " · slowest ends at " + fmtMs(t.end);
    const toggle = h("div", { class: "subs-toggle", text: label });
    toggle.addEventListener("click", () => {
      const set = query ? closed : open;
      if (set.has(listKey)) set.delete(listKey); else set.add(listKey);
      wrap.replaceWith(subList(L, it, B));
    });
    wrap.append(toggle);
    if (!isOpen) return wrap;
    wrap.append(waterfall(B));
    const rows = h("div", { class: "rows" });
    const limit = pages.get(listKey) || PAGE;
    shown.slice(0, limit).forEach((s) => rows.append(subRow(subKey(L, it, B, s, B.subs.indexOf(s)), s)));
    wrap.append(rows);
    if (shown.length > limit) {
      const more = h("button", { class: "more", text: "show " + Math.min(PAGE, shown.length - limit) + " more (" + (shown.length - limit) + " not shown)" });
      more.addEventListener("click", () => { pages.set(listKey, limit + PAGE); wrap.replaceWith(subList(L, it, B)); });
      wrap.append(more);
    }
    return wrap;
  }

  // ------------------------------------------------------------------ blocks, iterations, runs
  // A <details> whose open state survives re-renders (keyed), with its content built on first open.
  const folds = new Map(); // key -> open
  function fold(key, openByDefault, summary, build) {
    const isOpen = folds.has(key) ? folds.get(key) : openByDefault;
    const el = h("details", { open: isOpen, "data-fold": key }, h("summary", { text: summary }));
    let built = false;
    const fill = () => { if (!built) { built = true; el.append(build()); } };
    if (isOpen) fill();
    el.addEventListener("toggle", () => { folds.set(key, el.open); if (el.open) fill(); });
    return el;
  }
  function textBlock(key, label, text, cls, openIt) {
    if (text === null || text === undefined || text === "") return null;
    text = String(text);
    const lines = text.split("\n").length;
    return fold(key, openIt && text.length < 4000,
      label + " (" + lines + " line" + (lines === 1 ? "" : "s") + ", " + text.length + " chars)",
      () => h("pre", { class: cls, text }));
  }
  function blockEl(L, it, B) {
    const e = B.end || {};
    const el = h("div", { class: "block", "data-block": B.index });
    const head = h("div", { class: "block-head" }, h("b", { text: "block " + (B.index + 1) }),
      h("span", { class: "muted", text: B.end ? " · ran " + fmtMs(e.elapsed_ms) : " · running…" }),
      e.llm_calls ? h("span", { class: "muted", text: " · " + e.llm_calls + " llm call" + (e.llm_calls === 1 ? "" : "s") }) : null,
      e.error ? h("span", { class: "badge err", text: (e.error && e.error.code) || "error" }) : null,
      e.final !== undefined && e.final !== null ? h("span", { class: "badge final", text: "FINAL" }) : null,
      e.final_var ? h("span", { class: "badge final", text: "FINAL_VAR " + e.final_var }) : null,
      e.state_lost ? h("span", { class: "badge err", text: "state lost" }) : null);
    const at = L.id + "|" + it.n + "|" + B.index + "|";
    const texts = [textBlock("c|" + at, "code", B.code, "code", true), textBlock("o|" + at, "output", e.stdout, "stdout", true),
      textBlock("e|" + at, "stderr", e.stderr, "stderr", true)];
    el.append(head, ...texts.filter((x) => x)); // append() would print a null as "null"
    if (e.error) {
      el.append(h("div", { class: "error", text: "error: " + (e.error.type ? e.error.type + " " : "") + errText(e.error) }));
      if (e.error.traceback) el.append(textBlock("t|" + at, "traceback", String(e.error.traceback), "stderr", false));
    }
    if (e.final !== undefined && e.final !== null) el.append(h("div", { class: "answer", text: String(e.final) }));
    if (B.subs.length) el.append(subList(L, it, B));
    if (B.children.length) {
      const kids = h("div", { class: "children" });
      for (const id of B.children) kids.append(levelEl(level(id)));
      el.append(kids);
    }
    return el;
  }
  function messagesText(msgs) {
    if (!Array.isArray(msgs)) return "";
    return msgs.map((m) => "── " + (m && m.role) + " ──\n" + (m && typeof m.content === "string" ? m.content : JSON.stringify(m && m.content))).join("\n\n");
  }
  function noteEl(e) {
    const skip = new Set(["event", "t", "level", "iteration", "depth"]);
    const parts = Object.entries(e).filter(([k]) => !skip.has(k))
      .map(([k, v]) => k + "=" + oneLine(typeof v === "string" ? v : JSON.stringify(v), 120));
    return h("div", { class: "note" }, h("b", { text: e.event }), " ", parts.join(" · "));
  }
  function iterHead(it) {
    const T = iterTotals(it);
    const dur = it.t1 > it.t0 ? " · " + fmtMs((it.t1 - it.t0) * 1000) : "";
    return h("div", { class: "iter-head", title:
        "root model: " + fmtTok(T.model.i) + " in / " + fmtTok(T.model.o) + " out, " + fmtCost(T.model.c) +
        "\nsub-calls: " + fmtTok(T.sub.i) + " in / " + fmtTok(T.sub.o) + " out, " + fmtCost(T.sub.c) +
        "\nchild runs: " + fmtTok(T.child.i) + " in / " + fmtTok(T.child.o) + " out, " + fmtCost(T.child.c) },
      (it.ask ? "ask " + it.ask + " · " : "") + "iteration " + (it.n % 100000),
      h("span", { class: "muted iter-totals", text: " · " + it.blocks.size + " block" + (it.blocks.size === 1 ? "" : "s") +
        " · " + T.subs + " sub-call" + (T.subs === 1 ? "" : "s") + " · " + fmtTok(T.i) + " in / " + fmtTok(T.o) + " out · " +
        fmtCost(T.c) + dur + (isFinite(it.t0) ? " · at " + it.t0.toFixed(1) + " s" : "") }));
  }
  function iterEl(it) {
    const L = it.level;
    const el = h("div", { class: "iter", id: "it-" + L.id + "-" + it.n, "data-iteration": it.n });
    el.append(iterHead(it));
    it.calls.forEach((call, index) => {
      const at = L.id + "|" + it.n + "|" + index;
      const sent = call.added !== undefined ? call.added : call.messages;
      const u = usageOf(call);
      const what = (call.purpose && call.purpose !== "iteration" && call.purpose !== "act" ? call.purpose + " · " : "") +
        (call.model ? call.model + " · " : "") + fmtTok(u.i) + " in / " + fmtTok(u.o) + " out" +
        (call.cost_usd ? " · " + fmtCost(call.cost_usd) : "") + " · " + fmtMs(call.latency_ms) + (call.cached ? " · cached" : "");
      const count = Array.isArray(sent) ? sent.length : 0;
      const sentLabel = call.added === undefined ? "messages sent (" + count + ")"
        : call.reset ? "messages sent (the whole history: " + count + ")" : "new messages sent (" + count + ")";
      el.append(fold("m|" + at, false, sentLabel, () => h("pre", { text: messagesText(sent) })));
      el.append(fold("r|" + at, true, "model response · " + what, () => h("pre", { class: "response", text: call.response || "" })));
    });
    for (const b of [...it.blocks.keys()].sort((a, b) => a - b)) el.append(blockEl(L, it, it.blocks.get(b)));
    for (const note of it.notes) el.append(noteEl(note));
    return el;
  }
  function stripEl(L) {
    const iters = [...L.iters.values()].sort((a, b) => a.n - b.n);
    const strip = h("div", { class: "timeline", title: "iterations over time (click one to go to it)" });
    const spans = iters.map((it) => (isFinite(it.t0) && it.t1 > it.t0 ? it.t1 - it.t0 : 0));
    const total = spans.reduce((a, b) => a + b, 0);
    iters.forEach((it, i) => {
      const grow = total > 0 ? spans[i] / total : 1 / iters.length;
      strip.append(h("a", { href: "#it-" + L.id + "-" + it.n, style: "flex:" + Math.max(grow, 0.01) + " 1 0",
        title: "iteration " + it.n + (spans[i] ? ": " + fmtMs(spans[i] * 1000) : "") }));
    });
    return strip;
  }
  function levelHead(L) {
    const s = L.start || {};
    const isRoot = L.id === "0" || !L.parent;
    const head = h("div", { class: "run-head" });
    const title = isRoot ? "run " + (s.run || (M.runStart && M.runStart.run) || "") : "child run " + L.id + " (depth " + L.depth + ")";
    const T = levelTotals(L);
    head.append(h("h2", { text: title }));
    if (s.query) head.append(h("div", { class: "query" }, h("span", { class: "muted", text: "query: " }), oneLine(s.query, 600)));
    if (s.context) head.append(h("div", { class: "muted", text: "context: " + oneLine(typeof s.context === "string" ? s.context : JSON.stringify(s.context), 300) }));
    head.append(h("div", { class: "muted", text: L.iters.size + " iteration" + (L.iters.size === 1 ? "" : "s") + " · " + T.calls + " model call" + (T.calls === 1 ? "" : "s") +
      " · " + T.subs + " sub-calls · " + fmtTok(T.i) + " in / " + fmtTok(T.o) + " out · " + fmtCost(T.c) }));
    if (L.iters.size) head.append(stripEl(L));
    return head;
  }
  function levelFoot(L) {
    const foot = h("div", { class: "run-foot" });
    const end = L.id === "0" ? M.runEnd : L.end;
    const fin = L.final;
    const answer = end && end.answer !== undefined ? end.answer : fin ? fin.answer : undefined;
    const reason = (end && end.stop_reason) || (fin && fin.stop_reason);
    const error = (end && end.error) || (fin && fin.error);
    for (const note of L.notes) foot.append(noteEl(note));
    if (answer !== undefined || reason) {
      foot.append(h("div", { class: "muted", text: "stopped: " + (reason || "?") + (end && end.detail ? " (" + end.detail + ")" : "") +
        (end && end.elapsed_s !== undefined ? " · " + end.elapsed_s + " s" : "") }));
      foot.append(h("div", { class: "answer" + (error || (reason && reason !== "final" && reason !== "answered") ? " bad" : "") }, answer ? String(answer) : "(no answer)"));
      if (error) foot.append(h("div", { class: "error", text: errText(error) }));
    }
    return foot;
  }
  function levelEl(L) {
    if (!L.el) {
      L.el = h("section", { class: "run" + (L.id === "0" ? "" : " child"), "data-level": L.id });
      L.headEl = h("div");
      L.itersEl = h("div", { class: "iters" });
      L.footEl = h("div");
      L.el.append(L.headEl, L.itersEl, L.footEl);
      M.dirty.add(L);
    }
    return L.el;
  }

  // ------------------------------------------------------------------ rendering
  function render() {
    const main = document.getElementById("main");
    const root = M.levels.get("0");
    if (root && !root.el) {
      main.replaceChildren(levelEl(root));
    }
    // Iterations first (their blocks hold the child runs' sections), then the runs' heads.
    for (const x of M.dirty) {
      if (x.n === undefined) continue;
      const L = x.level;
      levelEl(L);
      const fresh = iterEl(x);
      if (x.el && x.el.parentNode) x.el.replaceWith(fresh);
      else {
        const after = [...L.iters.values()].filter((o) => o.n > x.n && o.el && o.el.parentNode).sort((a, b) => a.n - b.n)[0];
        if (after) L.itersEl.insertBefore(fresh, after.el); else L.itersEl.append(fresh);
      }
      x.el = fresh;
    }
    // A run's totals include its children's: refresh every ancestor's head too.
    const heads = new Set();
    for (const x of M.dirty) {
      let L = x.n === undefined ? x : x.level;
      while (L) { heads.add(L); L = L.parent ? M.levels.get(L.parent) : null; }
    }
    for (const L of heads) {
      levelEl(L);
      L.headEl.replaceChildren(levelHead(L));
      L.footEl.replaceChildren(levelFoot(L));
      if (L.id !== "0" && !L.placed && !M.unplaced.includes(L)) M.unplaced.push(L);
    }
    for (const L of M.unplaced) if (!L.placed && !L.el.parentNode) main.append(L.el);
    // ancestors' iterations show the children's totals: refresh those holding a changed child
    for (const L of heads) {
      if (!L.parent || !L.start || L.start.iteration === undefined) continue;
      const P = M.levels.get(L.parent);
      const pit = P && P.iters.get(num(L.start.iteration));
      if (pit && pit.el && !M.dirty.has(pit)) {
        const head = pit.el.querySelector(".iter-head");
        if (head) head.replaceWith(iterHead(pit));
      }
    }
    M.dirty.clear();
    totals();
  }
  function totals() {
    const root = M.levels.get("0");
    const el = document.getElementById("totals");
    if (!root) { el.textContent = ""; return; }
    const T = levelTotals(root);
    const run = M.runEnd && M.runEnd.usage;
    const handler = run && run.usage ? run : null; // the handler's own count, when the run ended
    const i = handler ? num(handler.usage.input_tokens) : T.i;
    const o = handler ? num(handler.usage.output_tokens) : T.o;
    const c = handler ? num(handler.cost_usd) : T.c;
    el.replaceChildren(
      h("b", { text: String(root.iters.size) }), " iterations · ",
      h("b", { text: String(M.subs) }), " sub-calls · ",
      h("b", { text: String(M.levels.size - 1) }), " child runs · ",
      h("b", { text: fmtTok(i) }), " tokens in · ", h("b", { text: fmtTok(o) }), " out · ",
      h("b", { class: "total-cost", text: fmtCost(c) }), handler ? " (handler's count)" : "",
      " · " + M.events + " events" + (M.bad ? " (" + M.bad + " unreadable lines skipped)" : ""));
    let matched = 0;
    if (query) for (const L of M.levels.values()) for (const it of L.iters.values()) for (const B of it.blocks.values()) for (const s of B.subs) if (matches(s)) matched++;
    const count = document.getElementById("match-count");
    count.textContent = query ? matched + " of " + M.subs + " sub-calls match" : "";
    count.dataset.query = query; // what the page shows now (the box is read after a short pause)
  }
  function setStatus(text, cls) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = "status " + cls;
  }
  function ended() {
    if (!M.runEnd) return false;
    const reason = M.runEnd.stop_reason;
    setStatus("finished" + (reason ? ": " + reason : ""), M.runEnd.error ? "failed" : "ended");
    return true;
  }

  // ------------------------------------------------------------------ search
  let searchTimer = null;
  document.getElementById("search").addEventListener("input", (ev) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      query = ev.target.value.trim().toLowerCase();
      closed.clear();
      pages.clear();
      for (const L of M.levels.values()) for (const it of L.iters.values()) {
        for (const B of it.blocks.values()) if (B.subs.length) { M.dirty.add(it); break; }
      }
      render();
    }, 120);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "/" && document.activeElement !== document.getElementById("search")) {
      ev.preventDefault();
      document.getElementById("search").focus();
    }
  });

  // ------------------------------------------------------------------ feeding
  document.getElementById("source").textContent = CONFIG.title || "";
  reset();
  function feed(events) {
    for (const e of events) ingest(e);
    render();
  }
  if (Array.isArray(CONFIG.events)) {
    feed(CONFIG.events);
    if (!ended()) setStatus("not finished when written", "ended");
  } else {
    (async function follow() {
      // gen: which file the offset is in, so a file rewritten in place and grown past it starts over.
      let offset = 0, wait = 0, gen = "";
      for (;;) {
        try {
          const url = CONFIG.events_url + "?offset=" + offset + "&gen=" + encodeURIComponent(gen) + "&wait=" + wait;
          const r = await fetch(url, { cache: "no-store" });
          if (!r.ok) throw new Error("HTTP " + r.status);
          const text = await r.text();
          if (r.headers.get("X-Rlmq-Reset") === "1") { reset(); open.clear(); closed.clear(); pages.clear(); folds.clear(); }
          const events = [];
          // Whole lines, as the file has them; a line that is not a JSON object is skipped.
          for (const line of text.split("\n")) {
            if (!line.trim()) continue;
            try {
              const e = JSON.parse(line);
              if (e && typeof e === "object" && !Array.isArray(e)) events.push(e); else M.bad++;
            } catch (err) { M.bad++; }
          }
          if (events.length) feed(events);
          const next = r.headers.get("X-Rlmq-Offset");
          if (next !== null && next !== "") offset = Number(next);
          gen = r.headers.get("X-Rlmq-Generation") || "";
          if (!ended()) setStatus(r.headers.get("X-Rlmq-Exists") === "1" ? "live" : "waiting for the file", "live");
          wait = r.headers.get("X-Rlmq-More") === "1" ? 0 : 20;
        } catch (err) {
          setStatus("viewer server unreachable, retrying", "offline");
          await new Promise((done) => setTimeout(done, 2000));
        }
      }
    })();
  }
})();
