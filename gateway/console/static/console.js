// The console's only script: copy buttons. No inline handlers (CSP: script-src 'self').
document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const text = document.getElementById(button.dataset.copy)?.textContent ?? "";
  navigator.clipboard.writeText(text).then(() => { button.textContent = "Copied"; },
                                           () => { button.textContent = "Select and copy"; });
});
