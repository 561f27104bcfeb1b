// The clinicians' page: asks /ask with stream=true, shows the triage banner before any answer text,
// the answer with [n] linked to its sources, what it is made of, and copies it with numbered sources.
// No framework, no external resource; the API key lives in sessionStorage and travels only as a
// bearer header. Nothing here writes the question anywhere but the request body.
"use strict";

const KEY_STORE = "medask-api-key";
const LANG_STORE = "medask-lang";

const TEXT = {
  en: {
    skip: "Skip to the question", language: "Language", keyHeading: "API key", keyOpen: "API key",
    keyHelp: "This service needs an API key. It is kept for this browser tab only and sent with each question, never in the address.",
    keyLabel: "API key", keySave: "Use this key", keyForget: "Forget the key", role: "Answer as",
    roleHelp: "a specialty from the list, or your own (up to 64 characters)", question: "Clinical question",
    questionHelp: "Enter asks; Shift+Enter starts a new line.",
    followUp: "Follow-up questions continue this conversation", newConversation: "New conversation",
    ask: "Ask", stop: "Stop", answer: "Answer", copy: "Copy with citations", sources: "Sources",
    noSources: "No sources were retrieved for this answer.",
    disclaimer: "MedAsk output is decision support for clinicians, not a diagnosis or treatment plan. Verify against clinical judgement and current guidelines.",
    asking: "Asking…", done: "Done.", stopped: "Stopped: the answer above is incomplete.", copied: "Copied with its sources.",
    copyFailed: "The browser did not allow copying; select the text instead.",
    keySaved: "Key saved for this tab.", keyForgotten: "Key forgotten.",
    level_emergency: "Emergency", level_crisis: "Crisis", level_urgent: "Urgent",
    madeOf_model: "Made of: the model's sentences that a cited source supports.",
    madeOf_evidence: "Made of: what the cited sources say (the model's text was not supported).",
    madeOf_mixed: "Made of: the model's supported sentences and what the cited sources add.",
    madeOf_refused: "Not a medical question: no model was asked.",
    grounding: (g) => `${g.sentences} sentence(s) checked, ${g.supported} supported, ${g.withheld} withheld (${g.mode}; the check is lexical and cannot see negation).`,
    perplexity: (p, pct) => `Perplexity ${p}: how predictable the answer was to the model, not whether it is correct` +
      (pct === null || pct === undefined ? "." : `; higher than ${pct}% of its answers to held-out questions.`),
    withheldByGate: "The quality gate withheld the model's text.",
    source: "source", conversationTurn: "Earlier question",
    err401: "This service needs an API key: enter it above, then ask again.",
    err413: "The question or conversation is too long: shorten it or start a new conversation.",
    err429: (s) => `The service is busy: try again in ${s} second(s).`,
    err503: (m) => `The service cannot answer right now (${m}). Try again shortly.`,
    errStream: (m) => `The answer was interrupted: ${m}`,
    errNetwork: "The service could not be reached.",
    errOther: (m) => `The request was refused: ${m}`,
    sourcesHeading: "Sources",
    feedbackHeading: "Was this answer right?", rateUp: "Yes, helpful", rateDown: "No",
    reasonsLegend: "What was wrong (optional)", r_wrong: "wrong", r_unsafe: "unsafe", r_outdated: "outdated",
    r_unsupported: "not supported by the sources", r_incomplete: "incomplete", r_off_topic: "off-topic",
    correctionLabel: "What it should say (optional)", sendFeedback: "Send feedback",
    feedbackThanks: "Thank you: your feedback was saved.", feedbackPick: "Choose yes or no first.",
    feedbackGone: "This answer can no longer be rated (it is older than the service keeps answers).",
  },
  "pt-BR": {
    skip: "Ir para a pergunta", language: "Idioma", keyHeading: "Chave de API", keyOpen: "Chave de API",
    keyHelp: "Este serviço precisa de uma chave de API. Ela fica só nesta aba do navegador e vai com cada pergunta, nunca no endereço.",
    keyLabel: "Chave de API", keySave: "Usar esta chave", keyForget: "Esquecer a chave", role: "Responder como",
    roleHelp: "uma especialidade da lista ou outra (até 64 caracteres)", question: "Pergunta clínica",
    questionHelp: "Enter pergunta; Shift+Enter começa uma nova linha.",
    followUp: "Perguntas seguintes continuam esta conversa", newConversation: "Nova conversa",
    ask: "Perguntar", stop: "Parar", answer: "Resposta", copy: "Copiar com as citações", sources: "Fontes",
    noSources: "Nenhuma fonte foi encontrada para esta resposta.",
    disclaimer: "A saída do MedAsk é apoio à decisão para profissionais de saúde, não um diagnóstico nem um plano de tratamento. Confira com o julgamento clínico e as diretrizes atuais.",
    asking: "Perguntando…", done: "Pronto.", stopped: "Interrompido: a resposta acima está incompleta.",
    copied: "Copiado com as fontes.", copyFailed: "O navegador não permitiu copiar; selecione o texto.",
    keySaved: "Chave guardada nesta aba.", keyForgotten: "Chave esquecida.",
    level_emergency: "Emergência", level_crisis: "Crise", level_urgent: "Urgente",
    madeOf_model: "Feita de: frases do modelo apoiadas por uma fonte citada.",
    madeOf_evidence: "Feita de: o que as fontes citadas dizem (o texto do modelo não tinha apoio).",
    madeOf_mixed: "Feita de: frases apoiadas do modelo e o que as fontes citadas acrescentam.",
    madeOf_refused: "Não é uma pergunta médica: o modelo não foi consultado.",
    grounding: (g) => `${g.sentences} frase(s) verificada(s), ${g.supported} com apoio, ${g.withheld} retida(s) (${g.mode}; a verificação é léxica e não vê negação).`,
    perplexity: (p, pct) => `Perplexidade ${p}: o quanto a resposta era previsível para o modelo, não se está correta` +
      (pct === null || pct === undefined ? "." : `; maior que ${pct}% das respostas dele a perguntas de teste.`),
    withheldByGate: "O controle de qualidade reteve o texto do modelo.",
    source: "fonte", conversationTurn: "Pergunta anterior",
    err401: "Este serviço precisa de uma chave de API: informe-a acima e pergunte de novo.",
    err413: "A pergunta ou a conversa é longa demais: encurte-a ou comece uma nova conversa.",
    err429: (s) => `O serviço está ocupado: tente de novo em ${s} segundo(s).`,
    err503: (m) => `O serviço não pode responder agora (${m}). Tente de novo em instantes.`,
    errStream: (m) => `A resposta foi interrompida: ${m}`,
    errNetwork: "Não foi possível falar com o serviço.",
    errOther: (m) => `O pedido foi recusado: ${m}`,
    sourcesHeading: "Fontes",
    feedbackHeading: "Esta resposta estava certa?", rateUp: "Sim, útil", rateDown: "Não",
    reasonsLegend: "O que estava errado (opcional)", r_wrong: "errada", r_unsafe: "insegura", r_outdated: "desatualizada",
    r_unsupported: "sem apoio nas fontes", r_incomplete: "incompleta", r_off_topic: "fora do tema",
    correctionLabel: "O que deveria dizer (opcional)", sendFeedback: "Enviar avaliação",
    feedbackThanks: "Obrigado: sua avaliação foi salva.", feedbackPick: "Escolha sim ou não primeiro.",
    feedbackGone: "Esta resposta não pode mais ser avaliada (é mais antiga do que o serviço guarda).",
  },
};

const $ = (id) => document.getElementById(id);
let lang = "en";
let controller = null; // the stream being read; Stop aborts it (the server frees the slot)
let history = []; // [{role, content}] of this conversation, oldest first
let last = null; // the last summary: what "copy with citations" copies

function t(key, ...args) {
  const value = (TEXT[lang] || TEXT.en)[key] ?? TEXT.en[key];
  return typeof value === "function" ? value(...args) : value;
}

function setLanguage(code) {
  lang = TEXT[code] ? code : "en";
  document.documentElement.lang = lang;
  $("lang").value = lang;
  sessionStorage.setItem(LANG_STORE, lang);
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  if (last) renderSummary(last);
}

function headers() {
  const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message || "";
}

function askForKey() {
  $("key-section").hidden = false;
  $("key").focus();
}

async function errorMessage(resp) {
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the status says it */ }
  if (resp.status === 401) { askForKey(); return t("err401"); }
  if (resp.status === 413) return t("err413");
  if (resp.status === 429) return t("err429", resp.headers.get("Retry-After") || "1");
  if (resp.status === 503) return t("err503", message);
  return t("errOther", message);
}

async function loadRoles() {
  try {
    const resp = await fetch("/roles", { headers: headers() });
    if (resp.status === 401) { askForKey(); return; }
    if (!resp.ok) return;
    const body = await resp.json();
    const list = $("roles");
    list.replaceChildren(...body.roles.map((r) => Object.assign(document.createElement("option"), { value: r })));
  } catch (_) { /* the role box still takes free text */ }
}

// ---- rendering --------------------------------------------------------------------------------

function showBanner(triage) {
  const banner = $("banner");
  const level = triage && triage.level;
  if (!["emergency", "crisis", "urgent"].includes(level)) { banner.hidden = true; return; }
  banner.className = `banner ${level}`;
  $("banner-level").textContent = t(`level_${level}`);
  const names = (triage.flags || []).map((f) => f.name).join("; ");
  $("banner-advice").textContent = triage.advice || names;
  const note = $("banner-note");
  note.textContent = triage.note || "";
  note.hidden = !triage.note;
  banner.hidden = false;
}

// the banner shows the rule-owned advice, so the answer box shows what follows it (copying keeps both)
function withoutAdvice(text, triage) {
  const advice = triage && triage.advice;
  return advice && text.startsWith(advice) ? text.slice(advice.length).replace(/^\s+/, "") : text;
}

// the answer's text with every [n] that names a source made a link to it
function renderAnswer(text, sources) {
  const out = $("answer");
  out.replaceChildren();
  const parts = text.split(/(\[\d+\])/);
  for (const part of parts) {
    const m = part.match(/^\[(\d+)\]$/);
    const n = m ? Number(m[1]) : 0;
    if (n >= 1 && n <= sources.length) {
      const a = document.createElement("a");
      a.href = `#source-${n}`;
      a.textContent = part;
      a.setAttribute("aria-label", `${t("source")} ${n}: ${sources[n - 1].title}`);
      out.append(a);
    } else {
      out.append(document.createTextNode(part));
    }
  }
}

function renderSources(sources) {
  const list = $("sources");
  list.replaceChildren();
  sources.forEach((s, i) => {
    const li = document.createElement("li");
    li.id = `source-${i + 1}`;
    li.tabIndex = -1;
    const title = document.createElement(s.url ? "a" : "span");
    title.textContent = s.title;
    if (s.url) {
      title.href = s.url;
      title.target = "_blank";
      title.rel = "noopener noreferrer";
    }
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = ` (${s.source})`;
    const snippet = document.createElement("p");
    snippet.className = "snippet";
    snippet.textContent = s.snippet || "";
    li.append(title, where, snippet);
    list.append(li);
  });
  $("no-sources").hidden = sources.length > 0;
}

function renderSummary(s) {
  const sources = s.citations || [];
  showBanner(s.triage);
  renderAnswer(withoutAdvice(s.answer, s.triage), sources);
  renderSources(sources);
  const madeOf = s.finish_reason === "refused" ? t("madeOf_refused") : s.answer_source ? t(`madeOf_${s.answer_source}`) : "";
  const grounding = s.grounding && s.grounding.mode !== "off" && s.grounding.sentences ? ` ${t("grounding", s.grounding)}` : "";
  const gate = s.quality && s.quality.degenerate ? ` ${t("withheldByGate")}` : "";
  $("made-of").textContent = madeOf + grounding + gate;
  const pct = s.quality ? s.quality.perplexity_percentile : null;
  $("perplexity").textContent = s.perplexity === null || s.perplexity === undefined ? (s.perplexity_note || "") : t("perplexity", s.perplexity, pct);
  $("copy").disabled = false;
  $("feedback-form").hidden = !s.id;
}

async function sendFeedback() {
  const rating = document.querySelector('input[name="rating"]:checked');
  if (!last || !rating) { $("feedback-status").textContent = t("feedbackPick"); return; }
  const body = { answer_id: last.id, rating: rating.value, rater_role: $("role").value.trim() || undefined };
  body.reasons = [...document.querySelectorAll("#reasons input:checked")].map((x) => x.value);
  const correction = $("correction").value.trim();
  if (correction) body.correction = correction;
  try {
    const resp = await fetch("/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (resp.status === 404) { $("feedback-status").textContent = t("feedbackGone"); return; }
    if (!resp.ok) { $("feedback-status").textContent = await errorMessage(resp); return; }
    $("feedback-status").textContent = t("feedbackThanks");
    $("send-feedback").disabled = true;
  } catch (_) {
    $("feedback-status").textContent = t("errNetwork");
  }
}

function copyText(s) {
  const sources = (s.citations || []).map((c, i) => `[${i + 1}] ${c.title} (${c.source})${c.url ? " " + c.url : ""}`);
  return [s.answer, "", `${t("sourcesHeading")}:`, ...sources, "", s.disclaimer].join("\n");
}

function rememberTurn(question, answer) {
  if (!$("follow-up").checked) return;
  history.push({ role: "user", content: question }, { role: "assistant", content: answer });
  history = history.slice(-32); // the API keeps at most 32 earlier turns
  const item = document.createElement("li");
  item.textContent = `${t("conversationTurn")}: ${question}`;
  $("conversation").append(item);
  $("conversation").hidden = false;
}

// ---- asking ----------------------------------------------------------------------------------

function parseEvent(raw) {
  let event = "message";
  const data = [];
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
}

async function ask() {
  const question = $("question").value.trim();
  if (!question || controller) return;
  showError("");
  last = null;
  $("copy").disabled = true;
  $("feedback-form").hidden = true;
  $("feedback-form").reset();
  $("send-feedback").disabled = false;
  $("feedback-status").textContent = "";
  $("result").hidden = false;
  $("banner").hidden = true;
  $("answer").replaceChildren();
  $("answer").setAttribute("aria-busy", "true");
  $("sources").replaceChildren();
  $("no-sources").hidden = true;
  $("made-of").textContent = "";
  $("perplexity").textContent = "";
  setStatus(t("asking"));
  $("ask").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  const body = { question, role: $("role").value.trim() || "General Practitioner", stream: true };
  if ($("follow-up").checked && history.length) body.history = history;
  let streamed = "";
  let triage = null;
  try {
    const resp = await fetch("/ask", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) { showError(await errorMessage(resp)); setStatus(""); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const { event, data } = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (event === "triage") { triage = data; showBanner(data); }
        else if (event === "token") { streamed += data.text; $("answer").textContent = withoutAdvice(streamed, triage); }
        else if (event === "summary") { last = data; renderSummary(data); rememberTurn(question, data.answer); setStatus(t("done")); }
        else if (event === "error") { showError(t("errStream", (data.error && data.error.message) || "error")); setStatus(""); }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") setStatus(t("stopped"));
    else { showError(t("errNetwork")); setStatus(""); }
  } finally {
    controller = null;
    $("ask").disabled = false;
    $("stop").disabled = true;
    $("answer").setAttribute("aria-busy", "false");
  }
}

async function copyWithCitations() {
  if (!last) return;
  const text = copyText(last);
  try {
    await navigator.clipboard.writeText(text);
    setStatus(t("copied"));
  } catch (_) {
    setStatus(t("copyFailed"));
  }
}

function init() {
  const stored = sessionStorage.getItem(LANG_STORE);
  const browser = (navigator.language || "en").toLowerCase().startsWith("pt") ? "pt-BR" : "en";
  setLanguage(stored || browser);
  $("lang").addEventListener("change", (e) => setLanguage(e.target.value));
  $("key-open").addEventListener("click", () => { $("key-section").hidden = !$("key-section").hidden; if (!$("key-section").hidden) $("key").focus(); });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key").value = "";
    $("key-section").hidden = true;
    showError("");
    setStatus(t("keySaved"));
    loadRoles();
    $("question").focus();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); setStatus(t("keyForgotten")); });
  $("ask-form").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); ask(); }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("copy").addEventListener("click", copyWithCitations);
  $("feedback-form").addEventListener("submit", (e) => { e.preventDefault(); sendFeedback(); });
  $("new-conversation").addEventListener("click", () => {
    history = [];
    $("conversation").replaceChildren();
    $("conversation").hidden = true;
    $("question").focus();
  });
  loadRoles();
}

document.addEventListener("DOMContentLoaded", init);
