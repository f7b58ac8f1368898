export { SystemdNotifier, statusText, MAX_STATUS_CHARS } from './notifier.js';
export type { SystemdNotifierOptions } from './notifier.js';
export { SystemdNotifyCommand, NotifyDeliveryError } from './notify-command.js';
export type { NotifySender, SystemdNotifyCommandOptions } from './notify-command.js';
export { agentStatusLine } from './status-line.js';
export type { ModelStatusView } from './status-line.js';
